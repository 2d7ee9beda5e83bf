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
