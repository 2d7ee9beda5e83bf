"""shards.storage against a local folder and the real SeaweedFS S3 (same functions, same results)."""
from __future__ import annotations

import os

import pytest

from shards import storage


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
        storage._atomic_local_write(str(target), lambda f: (f.write(b"partial"), 1 / 0))
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
