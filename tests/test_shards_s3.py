"""Sharding to and from the real SeaweedFS S3 store (fixture `s3`): write, read back with stock
webdataset through the s3 gopen handler, verify, tamper, S3 sources, crash + resume, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from shards import ShardError, shard_dataset, storage
from shards.reader import load_manifest, shard_urls
from shards.testdata import encode, photo_crops
from shards.verify import verify_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("s3src") / "tree"
    for i, crop in enumerate(photo_crops(30, size=(64, 48), seed=11)):
        folder = root / ("straße" if i % 2 else "ünï cöde")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"photo {i}.{'jpg' if i % 3 else 'png'}").write_bytes(encode(crop, "JPEG" if i % 3 else "PNG"))
    (root / "straße" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    return root


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_shard_to_s3_read_back_verify_and_tamper(s3, small_tree, tmp_path):
    url = s3.url("datasets/small")
    manifest = shard_dataset(str(small_tree), url, name="small", shard_size=8, workers=2)
    assert manifest["num_samples"] == 30 and manifest["dropped"] == {"corrupt_image": 1}
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix="datasets/small/")["Contents"]]
    assert "datasets/small/manifest.json" in keys and "datasets/small/small-000003.tar" in keys
    urls = shard_urls(url)
    assert urls[0] == f"{url}/small-000000.tar"
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))  # s3:// through the gopen handler
    assert len(samples) == 30 and {s["json"]["classes"][0] for s in samples} == {"straße", "ünï cöde"}
    local = shard_dataset(str(small_tree), str(tmp_path / "local"), name="small", shard_size=8)
    assert local["shards"] == manifest["shards"], "local and S3 output must be identical"
    assert verify_dataset(url) == []
    tampered = bytearray(storage.read_bytes(urls[2]))
    tampered[100] ^= 0x55
    storage.write_bytes(urls[2], bytes(tampered))
    problems = verify_dataset(url)
    assert problems and all(p.startswith("small-000002.tar") for p in problems)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_s3_sources_imagefolder_and_tars_give_same_shards(s3, small_tree, tmp_path):
    storage.copy_tree(str(small_tree), s3.url("sources/tree"))
    from_local = shard_dataset(str(small_tree), str(tmp_path / "a"), shard_size=10)
    from_s3 = shard_dataset(s3.url("sources/tree"), str(tmp_path / "b"), shard_size=10)
    assert from_s3["shards"] == from_local["shards"] and from_s3["source"]["kind"] == "imagefolder"
    tars = tmp_path / "tars"
    tars.mkdir()
    for folder in sorted(small_tree.iterdir()):
        with tarfile.open(tars / f"{folder.name}.tar", "w") as tar:
            for image in sorted(folder.iterdir()):
                tar.add(image, arcname=image.name)
    storage.copy_tree(str(tars), s3.url("sources/tars"))
    local_tars = shard_dataset(str(tars), str(tmp_path / "c"), shard_size=10)
    s3_tars = shard_dataset(s3.url("sources/tars"), s3.url("datasets/from-tars"), shard_size=10, workers=2)  # tars indexed in 2 processes
    assert s3_tars["shards"] == local_tars["shards"] and s3_tars["num_samples"] == 30


_KILL_SCRIPT = """
import os, signal, sys
from shards import shard_dataset
n = []
def hook(entry):
    n.append(entry)
    if len(n) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
shard_dataset(sys.argv[1], sys.argv[2], name="d", shard_size=300, seed=9, on_shard_done=hook)
"""


@pytest.mark.integration
@pytest.mark.timeout(150)
def test_killed_s3_writer_rerun_finishes_identically(s3, digits_tree, tmp_path):
    url = s3.url("datasets/crash")
    env = dict(os.environ, **s3.env)
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(digits_tree), url], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert not storage.exists(f"{url}/manifest.json")
    with pytest.raises(Exception, match="a dataset without a manifest does not exist"):
        load_manifest(url)
    assert storage.listdir(url) == ["_plan", "_progress", "d-000000.tar", "d-000001.tar"]  # _plan: scan records
    finished = shard_dataset(str(digits_tree), url, name="d", shard_size=300, seed=9, workers=2)
    assert not list(storage.iter_files(f"{url}/_plan"))  # the dataset is complete: its scan records are gone
    reference = shard_dataset(str(digits_tree), str(tmp_path / "ref"), name="d", shard_size=300, seed=9)
    assert finished["shards"] == reference["shards"]
    for shard in reference["shards"]:
        assert storage.read_bytes(f"{url}/{shard['name']}") == (tmp_path / "ref" / shard["name"]).read_bytes()


@pytest.mark.integration
def test_cli_shards_to_s3_and_prints_manifest_url(s3, small_tree, monkeypatch, capsys):
    from pipeline.cli import main

    url = s3.url("datasets/cli")
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the endpoint comes from --s3-endpoint here
    try:
        code = main(["--s3-endpoint", s3.endpoint, "shard", str(small_tree), url, "--name", "cli", "--shard-size", "16",
                     "--workers", "2"])
    finally:
        storage.configure(endpoint_url="")
    out = capsys.readouterr()
    assert code == 0, out.err
    assert f"manifest: {url}/manifest.json" in out.out
    assert s3.secret_key not in out.out + out.err
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    assert json.loads(storage.read_bytes(f"{url}/manifest.json"))["num_shards"] == 2
    assert main(["shard", str(small_tree), s3.url("datasets/strict"), "--strict"]) == 2  # bad records: input
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("vitpipe shard: error:")]
    assert len(errors) == 1 and "--strict" in errors[0] and "broken.jpg" in errors[0]


@pytest.mark.integration
def test_one_line_errors_for_bucket_credentials_and_endpoint(s3, small_tree, monkeypatch, tmp_path):
    with pytest.raises(ShardError, match="bucket 'missing-bucket' does not exist") as err:
        shard_dataset(str(small_tree), "s3://missing-bucket/x")
    assert "\n" not in str(err.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    with pytest.raises(ShardError, match="access denied") as err:
        shard_dataset(str(small_tree), s3.url("datasets/denied"))
    assert "wrong-secret-value" not in str(err.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    storage.configure(max_attempts=2)
    try:
        with pytest.raises(ShardError, match="cannot reach S3 endpoint http://127.0.0.1:9"):
            shard_dataset(s3.url("sources/none"), str(tmp_path / "never-written"))
    finally:
        storage.configure(max_attempts=5)


def _staging_files(tmpdir: Path) -> list[str]:
    return sorted(str(p.relative_to(tmpdir)) for p in tmpdir.rglob("*.partial"))


_STORE_DIES_SCRIPT = """
import os, signal, sys
import boto3.s3.inject
from shards import shard_dataset, storage
upload, calls = boto3.s3.inject.upload_file, []
def upload_file(self, *args, **kwargs):  # the store is killed while the 3rd shard goes up
    calls.append(1)
    if len(calls) == 3:
        os.kill(int(sys.argv[3]), signal.SIGKILL)
    return upload(self, *args, **kwargs)
boto3.s3.inject.upload_file = upload_file
storage.configure(max_attempts=2)
try:
    shard_dataset(sys.argv[1], sys.argv[2], name="d", shard_size=150, seed=9, workers=int(sys.argv[4]))
except storage.StorageError as err:
    print(f"{type(err).__name__} transient={err.transient}: {err}")
"""


@pytest.mark.integration
@pytest.mark.timeout(240)
@pytest.mark.parametrize("workers", [1, 2])
def test_a_store_killed_mid_upload_leaves_no_staging_files(digits_tree, tmp_path, workers):
    """A store of its own (this one is killed), written from 1 and from 2 worker processes: the upload
    that fails and the ones after it remove their staging files; the error is one transient line."""
    from pipeline.objectstore import pid_alive, start_seaweedfs

    store = start_seaweedfs(tmp_path / "store", access_key="kill-access", secret_key="kill-secret", buckets=("dying",))
    try:
        tmpdir = tmp_path / "tmp"
        tmpdir.mkdir()
        env = dict(os.environ, TMPDIR=str(tmpdir), AWS_ENDPOINT_URL=store.endpoint, AWS_ACCESS_KEY_ID="kill-access",
                   AWS_SECRET_ACCESS_KEY="kill-secret")
        proc = subprocess.run([sys.executable, "-c", _STORE_DIES_SCRIPT, str(digits_tree), "s3://dying/d",
                               str(store.pid), str(workers)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=200)
        assert not pid_alive(store.pid)
    finally:
        store.stop()
    assert proc.returncode == 0 and proc.stdout.startswith("StorageError transient=True: s3://dying/d/"), \
        proc.stdout + proc.stderr
    assert "cannot reach S3 endpoint" in proc.stdout and proc.stdout.count("\n") == 1
    assert _staging_files(tmpdir) == []


_WRITER_DIES_SCRIPT = """
import os, signal, sys
import boto3.s3.inject
def upload_file(self, *args, **kwargs):  # killed while the first shard goes up
    os.kill(os.getpid(), signal.SIGKILL)
boto3.s3.inject.upload_file = upload_file
from shards import shard_dataset
shard_dataset(sys.argv[1], sys.argv[2], name="d", shard_size=300, seed=9)
"""


@pytest.mark.integration
@pytest.mark.timeout(150)
def test_a_rerun_removes_the_staging_file_of_a_writer_killed_mid_upload(s3, digits_tree, tmp_path):
    """The staging file of a killed writer stays in TMPDIR (nothing can remove it then); the re-run,
    in the same TMPDIR, removes it and finishes the dataset."""
    url = s3.url("datasets/killed-upload")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = dict(os.environ, **s3.env, TMPDIR=str(tmpdir))
    proc = subprocess.run([sys.executable, "-c", _WRITER_DIES_SCRIPT, str(digits_tree), url], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    (left,) = _staging_files(tmpdir)
    assert ".d-000000.tar." in left and (tmpdir / left).stat().st_size > 0
    rerun = "import sys; from shards import shard_dataset; shard_dataset(sys.argv[1], sys.argv[2], name='d', " \
            "shard_size=300, seed=9, workers=2)"
    proc = subprocess.run([sys.executable, "-c", rerun, str(digits_tree), url], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert _staging_files(tmpdir) == []
    assert load_manifest(url)["num_samples"] == 1797


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_one_whole_object_get_per_image_the_scan_reads_only_the_ends(s3, tmp_path):
    """An S3 source costs one GET of each whole image (the writer's); the scan asks for ranges of
    the ends only: one ranged GET of the first 64 KB (an image that fits is settled by it), and for
    a larger image one more of its last KB."""
    src = s3.url("sources/gets")
    sizes = []
    crops = photo_crops(12, size=(320, 240), seed=4) + photo_crops(4, size=(640, 480), seed=6)
    for i, crop in enumerate(crops + photo_crops(4, size=(32, 24), seed=5)):
        data = encode(crop, "JPEG", quality=95)
        storage.write_bytes(f"{src}/{'ab'[i % 2]}/{i}.jpg", data)
        sizes.append(len(data))
    large = sum(size > 65536 for size in sizes)
    assert 0 < large < sum(size > 16384 for size in sizes)  # some between the old 16 KB head and 64 KB
    gets: list[str | None] = []
    client = storage.s3._client()
    handler = lambda params, **_: gets.append(params.get("Range"))  # noqa: E731 - the call's own arguments
    client.meta.events.register("provide-client-params.s3.GetObject", handler)
    try:
        decoded = shard_dataset(src, str(tmp_path / "decoded"), shard_size=100, workers=1, validate="decode")
        assert gets == [None] * 2 * len(sizes)  # a decoding scan needs every byte: one plain GET of each, then the writer's
        gets.clear()
        manifest = shard_dataset(src, str(tmp_path / "out"), shard_size=100, workers=1)
    finally:
        client.meta.events.unregister("provide-client-params.s3.GetObject", handler)
    assert manifest["num_samples"] == len(sizes)
    assert sum(r is None for r in gets) == len(sizes)  # whole objects: one per image
    ranged = [r for r in gets if r is not None]
    assert sorted(ranged).count("bytes=0-65535") == len(sizes)
    tails = [r for r in ranged if r != "bytes=0-65535"]
    assert len(tails) == large
    assert all(int(hi) - int(lo) + 1 == 1024 for lo, hi in (r[len("bytes="):].split("-") for r in tails))
    assert manifest["shards"] == decoded["shards"]


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_shard_reads_each_route_section_with_one_get(s3, small_tree):
    """A planned shard task knows where its section of each partition's route file lies: loading it
    costs one ranged GET per partition holding some of its records, and none for the others."""
    from shards import plan_shards

    url = s3.url("datasets/routes")
    plan = plan_shards(str(small_tree), url, shard_size=4, partitions=3)
    client = storage.s3._client()
    gets = []
    handler = lambda params, **_: gets.append((params["Key"], params.get("Range")))  # noqa: E731
    client.meta.events.register("provide-client-params.s3.GetObject", handler)
    try:
        for task in plan.tasks:
            gets.clear()
            assert len(task.loaded().records) == len(task)
            sections = [(route, lo, hi) for route, (lo, hi) in zip(task.routes, task.spans) if hi > lo]
            assert sorted(gets) == sorted((storage.split(route)[1], f"bytes={lo}-{hi - 1}") for route, lo, hi in sections)
    finally:
        client.meta.events.unregister("provide-client-params.s3.GetObject", handler)
    assert len(plan.tasks) == 8 and max(sum(hi > lo for lo, hi in task.spans) for task in plan.tasks) > 1


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_plan_file_is_streamed_up_with_one_put(s3, tmp_path):
    """A _plan/ file written member by member (write_arrays, never whole in memory) costs one PUT, as
    write_bytes of its bytes did; it holds the arrays where its spans say, on S3 and locally alike."""
    import numpy as np

    from shards.partitions import array_spans, unpack_arrays, write_arrays

    arrays = {"a": np.arange(5000, dtype=np.int64), "b": np.frombuffer(b"xyz" * 700, dtype=np.uint8)}
    calls: list[str] = []
    client = storage.s3._client()
    handler = lambda event_name, **_: calls.append(event_name.rsplit(".", 1)[-1])  # noqa: E731
    client.meta.events.register("provide-client-params.s3.*", handler)
    try:
        spans = write_arrays(s3.url("plan/x.npz"), arrays)
    finally:
        client.meta.events.unregister("provide-client-params.s3.*", handler)
    assert calls == ["PutObject"]
    data = storage.read_bytes(s3.url("plan/x.npz"))
    assert spans == array_spans(data) == write_arrays(str(tmp_path / "x.npz"), arrays)
    assert (tmp_path / "x.npz").read_bytes()[slice(*spans["a"])] == data[slice(*spans["a"])] == arrays["a"].tobytes()
    assert data[slice(*spans["b"])] == arrays["b"].tobytes()
    assert {name: value.tolist() for name, value in unpack_arrays(data).items()} == \
        {name: value.tolist() for name, value in arrays.items()}
