"""shards.index / `vitpipe index`: WebDataset shards written by webdataset's own ShardWriter get a
manifest, pass `vitpipe verify` and feed the training stream without re-sharding; `vitpipe shard`
refuses them with one line."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import webdataset as wds

from pipeline.cli import main as cli_main

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_foreign_shards(tree: Path, out: Path, *, per_class: int = 12) -> dict[str, int]:
    """Digits as shards made elsewhere: png + cls for even classes, png + cls + json {class_name}
    (img2dataset style) for odd ones, png + json {labels, classes} for 9, one sample with no label.
    Returns key -> label."""
    out.mkdir(parents=True)
    labels = {}
    with wds.ShardWriter(str(out / "foreign-%06d.tar"), maxcount=40) as sink:
        for c in range(10):
            for path in sorted((tree / str(c)).iterdir())[:per_class]:
                key = f"{c}_{path.stem}"
                sample = {"__key__": key, "png": path.read_bytes()}
                if c == 9:
                    sample["json"] = {"labels": [c], "classes": [NAMES[c]]}
                elif c % 2 == 0:
                    sample["cls"] = c
                else:
                    sample["cls"], sample["json"] = c, {"class_name": NAMES[c], "url": f"http://x/{key}"}
                sink.write(sample)
                labels[key] = c
        sink.write({"__key__": "nolabel_0", "png": path.read_bytes()})
    return labels


@pytest.fixture
def foreign(digits_tree, tmp_path):
    labels = write_foreign_shards(Path(digits_tree), tmp_path / "foreign")
    return tmp_path / "foreign", labels


def test_shard_refuses_webdataset_shards_in_one_line(foreign, tmp_path, capsys):
    folder, _ = foreign
    assert cli_main(["shard", str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"vitpipe index {folder}" in err
    assert not (tmp_path / "out").exists()


def test_index_then_verify_then_train_stream(foreign, capsys):
    from vit.data import TrainStream

    folder, labels = foreign
    assert cli_main(["index", str(folder)]) == 0
    manifest = json.loads((folder / "manifest.json").read_text())
    tars = sorted(p.name for p in folder.glob("*.tar"))
    assert [s["name"] for s in manifest["shards"]] == tars and len(tars) == 4  # 121 samples, 40 per shard
    for s in manifest["shards"]:
        data = (folder / s["name"]).read_bytes()
        assert s["sha256"] == hashlib.sha256(data).hexdigest() and s["bytes"] == len(data)
    assert manifest["num_samples"] == 121 and manifest["name"] == "foreign"
    assert manifest["classes"] == [str(c) if c % 2 == 0 else NAMES[c] for c in range(10)]
    assert manifest["label_histogram"] == [12] * 10
    assert manifest["skipped"] == [{"key": "nolabel_0", "shard": "foreign-000003.tar",
                                    "reason": "no label (.cls, or .json labels)", "kind": "unlabeled"}]
    assert json.loads((folder / "_info.json").read_text())["splits"]["foreign"]["shard_lengths"] == [40, 40, 40, 1]
    capsys.readouterr()
    assert cli_main(["verify", str(folder)]) == 0, capsys.readouterr().err
    stream = TrainStream(str(folder), img_size=16, global_batch_size=8, rank=0, world_size=1, num_workers=0,
                         lanes=4, augment="none", shuffle_buffer=8)
    seen = {}
    for batch in stream.batches(0):
        seen.update(zip(batch.keys, batch.targets.tolist()))
    assert seen.items() <= labels.items() and len(seen) >= 112  # an epoch drops the last partial batch
    assert cli_main(["index", str(folder)]) == 2  # already a dataset: one line, nothing rewritten
    assert "already a dataset" in capsys.readouterr().err


def test_index_refuses_folders_without_usable_shards(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli_main(["index", str(tmp_path / "empty")]) == 2
    assert "no .tar shards there" in capsys.readouterr().err
    os.makedirs(tmp_path / "nolabels")
    with wds.ShardWriter(str(tmp_path / "nolabels" / "x-%06d.tar"), maxcount=10) as sink:
        sink.write({"__key__": "a", "txt": "hello"})
    assert cli_main(["index", str(tmp_path / "nolabels")]) == 2
    assert "no sample has an image and a label" in capsys.readouterr().err
    assert not (tmp_path / "nolabels" / "manifest.json").exists()


@pytest.mark.integration
def test_index_an_s3_prefix(s3, foreign, capsys):
    from shards import storage

    folder, labels = foreign
    prefix = s3.url("index/foreign")
    for tar in sorted(folder.glob("*.tar")):
        storage.upload_file(tar, storage.join(prefix, tar.name))
    assert cli_main(["index", prefix]) == 0
    manifest = storage.read_json(storage.join(prefix, "manifest.json"))
    local = {s.name: hashlib.sha256(s.read_bytes()).hexdigest() for s in folder.glob("*.tar")}
    assert {s["name"]: s["sha256"] for s in manifest["shards"]} == local
    assert manifest["num_samples"] == 121 and len(manifest["skipped"]) == 1
    capsys.readouterr()
    assert cli_main(["verify", prefix]) == 0, capsys.readouterr().err
