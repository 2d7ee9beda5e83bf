"""shards.storage against a local folder and the real SeaweedFS S3 (same functions, same results)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shards import storage
from shards.errors import VitpipeError

ROOT = Path(__file__).resolve().parents[1]
VITPIPE = Path(sys.executable).parent / "vitpipe"


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def base(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    s3 = request.getfixturevalue("s3")
    return s3.url(f"test-storage/{request.node.name.replace('[', '-').rstrip(']')}")


def test_roundtrip_list_copy_delete(base, tmp_path):
    storage.write_bytes(storage.join(base, "a.bin"), b"abc")
    storage.write_json(storage.join(base, "sub", "m ü.json"), {"x": [1, 2]})
    assert storage.read_bytes(storage.join(base, "a.bin")) == b"abc"
    assert storage.read_json(storage.join(base, "sub", "m ü.json")) == {"x": [1, 2]}
    assert storage.exists(storage.join(base, "a.bin")) and storage.exists(storage.join(base, "sub"))
    assert not storage.exists(storage.join(base, "missing.bin"))
    assert storage.size(storage.join(base, "a.bin")) == 3
    assert storage.listdir(base) == ["a.bin", "sub"]
    assert storage.list_recursive(base) == [storage.join(base, "a.bin"), storage.join(base, "sub", "m ü.json")]
    import hashlib
    assert storage.sha256_url(storage.join(base, "a.bin")) == hashlib.sha256(b"abc").hexdigest()
    copied = storage.copy_tree(base, str(tmp_path / "copy"))
    assert sorted(os.path.relpath(p, tmp_path / "copy") for p in copied) == ["a.bin", os.path.join("sub", "m ü.json")]
    storage.delete(storage.join(base, "a.bin"))
    assert not storage.exists(storage.join(base, "a.bin"))
    with pytest.raises(storage.StorageNotFound, match="missing.bin"):
        storage.read_bytes(storage.join(base, "missing.bin"))


@pytest.mark.integration
def test_big_upload_download_streams(s3, tmp_path):
    storage.configure(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
    try:
        data = os.urandom(12 * 1024 * 1024 + 17)
        (tmp_path / "big.bin").write_bytes(data)
        url = s3.url("test-storage/big/big.bin")
        storage.upload_file(tmp_path / "big.bin", url)
        head = s3.client().head_object(Bucket=s3.bucket, Key="test-storage/big/big.bin")
        assert "-" in head["ETag"], "a file above the threshold must go up as a multipart upload"
        with storage.open_read(url) as f:
            assert f.read(10) == data[:10]
            assert f.read() == data[10:]
        storage.download_file(url, tmp_path / "back.bin")
        assert (tmp_path / "back.bin").read_bytes() == data
    finally:
        storage.configure(multipart_threshold=64 * 1024 * 1024, multipart_chunksize=16 * 1024 * 1024)


@pytest.mark.integration
def test_one_line_errors_for_bucket_credentials_endpoint(s3, monkeypatch):
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage.read_bytes("s3://no-such-bucket/x")
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage.check_writable("s3://no-such-bucket/out")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong")
    with pytest.raises(storage.StorageError, match="access denied") as err:
        storage.write_bytes(s3.url("test-storage/denied.bin"), b"x")
    assert "definitely-wrong" not in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    storage.configure(endpoint_url="http://127.0.0.1:9", max_attempts=2)
    try:
        with pytest.raises(storage.StorageError, match="cannot reach S3 endpoint http://127.0.0.1:9"):
            storage.exists(s3.url("x"))
    finally:
        storage.configure(endpoint_url="", max_attempts=5)


def test_local_write_is_atomic(tmp_path):
    target = tmp_path / "out" / "f.bin"
    storage.write_bytes(target, b"first")
    with pytest.raises(ZeroDivisionError):
        storage.local._atomic_local_write(str(target), lambda f: (f.write(b"partial"), 1 / 0))
    assert target.read_bytes() == b"first"
    assert os.listdir(tmp_path / "out") == ["f.bin"]


def test_read_with_an_expected_size_still_returns_the_whole_file(tmp_path):
    """The writer passes the size the scan saw; a file that has grown or shrunk since comes back
    whole, so its size check fails instead of a shard taking a cut copy."""
    data = os.urandom(300_000)
    (tmp_path / "f").write_bytes(data)
    for expected in (300_000, 1000, 299_999, 300_001, 2_000_000, 0):
        assert storage.read_bytes(str(tmp_path / "f"), size=expected) == data
    assert storage.read_record(str(tmp_path / "f"), 1000, 24) == data[1000:1024]
    mtime = (tmp_path / "f").stat().st_mtime
    assert storage.read_ends(str(tmp_path / "f"), 100, 10, 1000, 5000) == (data[1000:1100], data[5990:6000], 5000, None)
    assert storage.read_ends(str(tmp_path / "f"), 100, 10) == (data[:100], data[-10:], 300_000, mtime)
    assert storage.read_ends(str(tmp_path / "f"), 10**6, 10) == (data, b"", 300_000, mtime)


BAD_URLS = {  # what is refused, and what the message says to write instead
    "gs://bucket/data": "'gs://' URLs are not supported; write a local path or s3://BUCKET/PREFIX",
    "http://example.com/data": "'http://' URLs are not supported; write a local path or s3://BUCKET/PREFIX",
    "s3:/bucket/x": "malformed S3 URL; write s3://BUCKET/PREFIX",
    "S3://bucket/x": "malformed S3 URL; write s3://BUCKET/PREFIX",
    "s3://": "missing bucket name; write s3://BUCKET/PREFIX",
    "s3:///key": "missing bucket name; write s3://BUCKET/PREFIX",
}


def test_urls_other_than_local_paths_and_s3_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    """Until now `s3:/bucket/x` and `gs://x` were taken for local paths: folders named `s3:` and `gs:`
    appeared in the working directory."""
    monkeypatch.chdir(tmp_path)
    for url, message in BAD_URLS.items():
        for call in (lambda: storage.write_bytes(storage.join(url, "a.bin"), b"x"), lambda: storage.makedirs(url),
                     lambda: storage.check_writable(url), lambda: storage.exists(url),
                     lambda: storage.upload_file(__file__, url), lambda: storage.is_s3(url)):
            with pytest.raises(storage.StorageError) as err:
                call()
            assert str(err.value).startswith(url.rstrip("/")) and message in str(err.value), (url, str(err.value))
            assert isinstance(err.value, VitpipeError) and err.value.exit_code == 2 and not err.value.transient
    assert list(tmp_path.iterdir()) == []
    # what is accepted: local paths (also with a colon in a name, or file://) and s3://BUCKET[/KEY]
    assert storage.backend("data:2024/x")[1] == "data:2024/x" and storage.backend("file:///a/b")[1] == "/a/b"
    assert storage.is_s3("s3://bucket") and storage.split("s3://bucket/a/b") == ("bucket", "a/b")


def test_cli_shard_to_a_malformed_s3_url_exits_2_and_writes_nothing(tmp_path, digits_tree):
    """`vitpipe shard SRC s3:/bucket/x` used to shard into a local folder named `./s3:`."""
    proc = subprocess.run([str(VITPIPE), "shard", str(digits_tree), "s3:/bucket/x"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "vitpipe shard: error: s3:/bucket/x: malformed S3 URL; write s3://BUCKET/PREFIX (lower-case 's3', two slashes)"]
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_store_is_a_transient_error_and_a_missing_file_is_not(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    storage.configure(endpoint_url="http://127.0.0.1:9", max_attempts=1)  # nothing listens on port 9
    try:
        with pytest.raises(storage.StorageError, match="cannot reach S3 endpoint http://127.0.0.1:9") as err:
            storage.read_bytes("s3://bucket/x")
    finally:
        storage.configure(endpoint_url="", max_attempts=5)
    assert err.value.transient and isinstance(err.value, VitpipeError)
    with pytest.raises(storage.StorageNotFound) as err:
        storage.read_bytes(tmp_path / "missing")
    assert not err.value.transient and isinstance(err.value, FileNotFoundError)


def test_disk_full_and_read_only_outputs_are_one_line_errors_naming_the_path(small_disk):
    target = small_disk / "out" / "big.bin"
    with pytest.raises(storage.StorageError) as err:
        storage.write_bytes(target, os.urandom(400 * 1024))
    assert str(err.value) == f"{target}: cannot write: no space left on the device; free space or write elsewhere"
    assert list((small_disk / "out").iterdir()) == []  # the temporary file is gone
    storage.write_bytes(small_disk / "small.bin", b"kept")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(storage.StorageError, match=f"^{small_disk}/small.bin: cannot write: read-only file system"):
        storage.write_bytes(small_disk / "small.bin", b"new")
    with pytest.raises(storage.StorageError, match=f"^{small_disk}/new: cannot write: read-only file system"):
        storage.check_writable(small_disk / "new")
    with pytest.raises(storage.StorageError, match=f"^{small_disk}: output folder is not writable"):
        storage.check_writable(small_disk)
    assert (small_disk / "small.bin").read_bytes() == b"kept"


_WRITE_JSON = """
import sys
from shards import storage
try:
    storage.write_json(sys.argv[1], {"a": 1})
except storage.StorageError as err:
    print(err)
"""


def test_permission_denied_is_a_one_line_error_naming_the_path(tmp_path):
    """A folder of another user, written by root without the capability to override file permissions
    (`setpriv` drops it; root may write anywhere otherwise)."""
    folder = tmp_path / "not-mine"
    folder.mkdir(mode=0o755)
    os.chown(folder, 65534, 65534)
    proc = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c",
                           _WRITE_JSON, str(folder / "m.json")], capture_output=True, text=True, cwd=ROOT)
    expected = f"{folder}/m.json: cannot write: permission denied; fix the permissions or write elsewhere\n"
    assert proc.stdout == expected, proc.stderr
    assert list(folder.iterdir()) == []


def test_stale_staging_files_are_those_of_writers_that_no_longer_run(tmp_path):
    """A live writer's staging file (another worker of the same run) is kept; a dead one's, and one
    named as older versions did (no owner), are removed; with a name, only that file's."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = storage._HOST
    names = {"alive": f".d-000001.tar.{os.getpid()}@{host}.abc123.partial",
             "dead": f".d-000001.tar.{dead.stdout.strip()}@{host}.def456.partial",
             "dead other shard": f".d-000002.tar.{dead.stdout.strip()}@{host}.ghi789.partial",
             "old naming": ".d-000003.tar.jkl012.partial", "not staging": ".d-000001.tar.json.tmp"}
    for name in names.values():
        (tmp_path / name).write_bytes(b"")
    assert storage.remove_stale_staging(tmp_path, "d-000001.tar") == [str(tmp_path / names["dead"])]
    assert sorted(storage.remove_stale_staging(tmp_path)) == sorted(
        str(tmp_path / names[k]) for k in ("dead other shard", "old naming"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["alive"], names["not staging"]])
    with storage.staged(tmp_path / "d-000004.tar") as staging:  # what a writer names its own
        assert storage._STAGING_NAME.fullmatch(os.path.basename(staging.path))["name"] == "d-000004.tar"
        os.write(staging.fd, b"data")
        os.close(staging.fd)
        staging.publish()
    assert (tmp_path / "d-000004.tar").read_bytes() == b"data"
