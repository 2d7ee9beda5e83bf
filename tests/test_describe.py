"""shards.describe: a dataset read by other tools' own readers (timm's WebDataset reader, Hugging Face
`datasets`' webdataset builder and dataset cards), every sample with the right label and class name."""
from __future__ import annotations

import glob
import json
import os
import tarfile

import datasets
import pytest
from timm.data import create_dataset


def samples_in_order(dataset: str) -> list[dict]:
    """(key, label, class names) of every sample, in manifest order, read with tarfile."""
    manifest = json.load(open(os.path.join(dataset, "manifest.json")))
    out = []
    for shard in manifest["shards"]:
        with tarfile.open(os.path.join(dataset, shard["name"])) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    meta = json.load(tar.extractfile(m))
                    out.append({"key": m.name[:-5], "label": meta["labels"][0], "classes": meta["classes"]})
    return out


def test_timm_wds_reader_reads_every_sample_with_its_label(digits_shards):
    info = json.load(open(os.path.join(digits_shards, "_info.json")))
    manifest = json.load(open(os.path.join(digits_shards, "manifest.json")))
    assert info["splits"]["digits"]["filenames"] == [s["name"] for s in manifest["shards"]]
    ds = create_dataset("wds/digits", root=digits_shards, split="digits")  # timm's own reader
    assert len(ds) == manifest["num_samples"] == 1797
    got = [(img.size, int(target)) for img, target in ds]
    want = samples_in_order(digits_shards)
    assert [t for _, t in got] == [s["label"] for s in want]
    assert {size for size, _ in got} == {(32, 32)}
    assert all(s["classes"] == [info["classes"][s["label"]]] for s in want)


def test_hugging_face_webdataset_builder_reads_labels_and_class_names(digits_shards, tmp_path):
    manifest = json.load(open(os.path.join(digits_shards, "manifest.json")))
    tars = sorted(glob.glob(os.path.join(digits_shards, "*.tar")))
    ds = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train", cache_dir=str(tmp_path))
    assert ds.num_rows == 1797
    want = {s["key"]: s for s in samples_in_order(digits_shards)}
    for row in ds:
        assert row["cls"] == want[row["__key__"]]["label"] == row["json"]["labels"][0]
        assert row["json"]["classes"] == [manifest["classes"][row["cls"]]]
    assert row["png"].size == (32, 32)
    # the dataset card: load_dataset(<folder>) gives a ClassLabel carrying the class names
    card = datasets.load_dataset(digits_shards, split="digits", cache_dir=str(tmp_path / "card"))
    assert card.features["cls"].names == manifest["classes"]
    assert card.num_rows == 1797
    assert [card.features["cls"].int2str(c) for c in card["cls"][:50]] == \
        [manifest["classes"][want[k]["label"]] for k in card["__key__"][:50]]


def test_info_is_written_before_the_manifest(tmp_path, digits_tree):
    from shards import shard_dataset
    from shards import storage

    order = []
    real = storage.write_json

    def spy(url, obj, **kw):
        order.append(os.path.basename(url))
        return real(url, obj, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(storage, "write_json", spy)
        shard_dataset(str(digits_tree), str(tmp_path / "ds"), name="train", shard_size=1000)
    assert order.index("_info.json") < order.index("manifest.json") == len(order) - 1
    info = json.load(open(tmp_path / "ds" / "_info.json"))
    assert info["splits"]["train"]["shard_lengths"] == [1000, 797]


# ----------------------------------------------------------------------------- s3:// without a project import

# a reader in a fresh interpreter that imports no project module (checked at its end)
_NO_PROJECT = """
import json, sys
{body}
assert not {{"shards", "vit", "pipeline"}} & set(m.split(".")[0] for m in sys.modules), "imported the project"
"""


def run_stock(body: str, env: dict) -> dict:
    import subprocess
    import sys

    code = _NO_PROJECT.format(body=body)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/",
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def s3_digits(s3, digits_tree):
    from shards import shard_dataset

    url = s3.url("describe/digits")
    shard_dataset(str(digits_tree), url, name="train", shard_size=400, seed=0)
    return url


def _labels_by_key(url: str) -> dict[str, int]:
    from shards import storage
    from shards.reader import shard_urls

    out = {}
    for shard in shard_urls(url):
        with storage.open_read(shard) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for m in tar:
                if m.name.endswith(".cls"):
                    out[m.name[:-4]] = int(tar.extractfile(m).read())
    return out


@pytest.mark.integration
def test_hugging_face_reads_s3_through_s3fs(s3, s3_digits, tmp_path):
    # streaming=True is not used: datasets 5.2 passes block_size=0 into the S3 filesystem's constructor
    # there (AioSession ... 'block_size'), an upstream bug whatever the s3fs version
    want = _labels_by_key(s3_digits)
    body = f"""
import datasets
opts = dict(key={s3.access_key!r}, secret={s3.secret_key!r}, client_kwargs=dict(endpoint_url={s3.endpoint!r}))
ds = datasets.load_dataset("webdataset", data_files={{"train": "{s3_digits}/train-*.tar"}}, split="train",
                           storage_options=opts, cache_dir={str(tmp_path)!r})
rows = {{r["__key__"]: [r["cls"], r["json"]["classes"], r["png"].size] for r in ds}}
print(json.dumps(rows))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # only storage_options
    rows = run_stock(body, env)
    assert {k: v[0] for k, v in rows.items()} == want and len(want) == 1797
    assert all(v[1] == [str(v[0])] and v[2] == [32, 32] for v in rows.values())


@pytest.mark.integration
def test_stock_webdataset_reads_presigned_urls_the_cli_prints(s3, s3_digits):
    import subprocess
    import sys

    urls = subprocess.run([sys.executable, "-m", "pipeline.cli", "urls", s3_digits], capture_output=True, text=True,
                          env=os.environ)
    assert urls.returncode == 0, urls.stderr
    urls = urls.stdout.split()
    assert len(urls) == 5 and all(u.startswith(s3.endpoint + "/") and "Signature=" in u for u in urls)
    body = f"""
import webdataset as wds
ds = wds.WebDataset({urls!r}, shardshuffle=False).decode()
print(json.dumps({{s["__key__"]: s["cls"] for s in ds}}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # no credentials on the reading side
    assert run_stock(body, env) == _labels_by_key(s3_digits)


@pytest.mark.integration
def test_timm_reader_on_s3_root_reads_all_or_fails_loudly(s3, s3_digits):
    import shards.reader  # noqa: F401  the project's gopen handler for s3:// (registered on import)

    ds = create_dataset("wds/train", root=s3_digits, split="train")
    assert sorted(int(t) for _, t in ds) == sorted(_labels_by_key(s3_digits).values())
    body = f"""
from timm.data import create_dataset
try:
    ds = create_dataset("wds/train", root={s3_digits!r}, split="train")
    n = sum(1 for _ in ds)
    print(json.dumps({{"samples": n}}))
except RuntimeError as err:
    print(json.dumps({{"error": str(err)}}))
"""
    out = run_stock(body, dict(os.environ))
    assert "split train not found" in out.get("error", ""), out  # never a silent empty dataset
