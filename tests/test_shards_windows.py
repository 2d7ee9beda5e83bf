"""The windowed plan (shards.windows, `vitpipe shard --window`): the same bytes for any partitions
and workers, de-duplication and colliding keys across windows (the first copy in listing order
stays), a shard written before the last class folder (or jsonl block) is scanned, a run killed
mid-way that resumes to the same bytes, and jsonl/csv manifests (the global plan's classes and
multi-label flag)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from shards import shard_dataset
from shards.testdata import encode, photo_crops

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ["a b", "a_b", "c", "d", "e", "f"]


def _write_tree(root: Path, gate: bool = False) -> None:
    """Six class folders of 4-5 crops; with a window of 4 records each folder is a window of its own."""
    crops = photo_crops(24, size=(96, 72), seed=7)
    files = {f"{FOLDERS[i % 6]}/{i:02d}.jpg": encode(crop, "JPEG", quality=90) for i, crop in enumerate(crops[:22])}
    twin = bytearray(files["c/02.jpg"])  # same size, first and last KB as c/02.jpg, other bytes between
    middle = len(twin) // 2
    twin[middle:middle + 16] = bytes(b ^ 0x5A for b in twin[middle:middle + 16])
    files.update({
        "a b/x.jpg": encode(crops[22], "PNG"), "a_b/x.jpg": encode(crops[23], "PNG"),  # both keyed a_b_x
        "e/dup.jpg": files["a b/00.jpg"],  # a copy in a later window
        "d/dup-in.jpg": files["d/03.jpg"],  # a copy in its own window
        "f/twin.jpg": bytes(twin),  # the same content key read from the ends, not the same bytes
        "../eval/e/same.jpg": files["f/05.jpg"]})
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    if gate:  # the last folder's scan waits at this FIFO until a writer opens it
        os.mkfifo(root / "f" / "zz-gate.jpg")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("windows") / "tree"
    _write_tree(root)
    return root


def _dataset(out: Path, manifest: dict) -> dict:
    return {"shards": manifest["shards"], "skipped": manifest["skipped"], "histogram": manifest["label_histogram"],
            "fingerprint": manifest["fingerprint"], "source": manifest["source"],
            "bytes": {s["name"]: (out / s["name"]).read_bytes() for s in manifest["shards"]}}


def _shard_members(path: Path) -> list[tuple[str, str]]:
    """(key, class folder) of each sample of a shard."""
    import json

    with tarfile.open(path) as tar:
        return [(m.name.rsplit(".", 1)[0], json.loads(tar.extractfile(m).read())["path"].split("/")[0])
                for m in tar.getmembers() if m.name.endswith(".json")]


@pytest.mark.parametrize("settings", [
    {"shard_size": 3},
    {"shard_size": 50, "max_shard_bytes": 64 * 1024, "exclude": "EVAL"},
], ids=["header", "bytes+exclude"])
def test_the_same_dataset_for_any_partitions_and_workers(tree, tmp_path, settings):
    from shards import source_fingerprint

    settings = dict(settings, seed=4, window=4)
    if settings.get("exclude") == "EVAL":
        settings["exclude"] = str(tree.parent / "eval")
    outs = {(p, w): tmp_path / f"p{p}w{w}" for p, w in ((1, 1), (2, 1), (3, 2), (5, 2))}
    runs = {key: _dataset(out, shard_dataset(str(tree), str(out), partitions=key[0], workers=key[1], **settings))
            for key, out in outs.items()}
    assert not any((out / "_plan").exists() for out in outs.values())
    reference = runs[1, 1]
    assert [key for key, got in runs.items() if got != reference] == []
    assert reference["source"]["fingerprint"] == source_fingerprint(str(tree))  # the whole listing's, as without
    assert reference["source"]["records"] == 27
    # a shard holds the records of one window (here: one class folder), in the windows' order
    folders = []
    for shard in reference["shards"]:
        held = {folder for _, folder in _shard_members(tmp_path / "p1w1" / shard["name"])}
        assert len(held) == 1, (shard["name"], held)
        folders += held
    assert folders == sorted(folders, key=FOLDERS.index)
    kinds = {s["path"]: (s["kind"], s["reason"]) for s in reference["skipped"]}
    assert kinds["e/dup.jpg"] == ("duplicate_exact", "exact duplicate of a b/00.jpg")  # a later window's copy
    assert kinds["d/dup-in.jpg"] == ("duplicate_exact", "exact duplicate of d/03.jpg")  # within its window
    assert "f/twin.jpg" not in kinds  # confirmed by its bytes: not a copy
    if "exclude" in settings:
        assert kinds["f/05.jpg"][0] == "excluded_exact"
        assert all(s["bytes"] <= 64 * 1024 for s in reference["shards"])
    names = [key for shard in reference["shards"] for key, _ in _shard_members(tmp_path / "p1w1" / shard["name"])]
    assert len(names) == len(set(names)) == sum(s["samples"] for s in reference["shards"])
    # "a b/x.jpg" (first window) keeps a_b_x; "a_b/x.jpg" (the next window) is renamed
    assert "a_b_x" in names and sum(name.startswith("a_b_x_") for name in names) == 1


def test_the_windowed_plan_files_are_arrays_only(tree, tmp_path, monkeypatch):
    """Mid-run, every file the windows leave in <out>/_plan (scan records, states, routes, the key
    files later windows read) is an .npz of .npy arrays that loads with allow_pickle=False, and a
    shard reads its section of each route file with one ranged read, as without a window."""
    import zipfile

    import numpy as np

    from shards import storage
    from shards.writer import write_shard

    out, seen, reads = tmp_path / "out", set(), []
    read_range = storage.read_range
    monkeypatch.setattr(storage, "read_range", lambda url, start, size: reads.append((url, start, size))
                        or read_range(url, start, size))

    def write(batch):
        for path in (out / "_plan").iterdir():
            seen.add(path.name[:2])
            assert all(name.endswith(".npy") for name in zipfile.ZipFile(path).namelist()), path
            with np.load(path, allow_pickle=False) as data:
                assert all(data[name].dtype != object for name in data.files), path
        for task in batch:
            reads.clear()
            assert len(task.loaded().records) == len(task)
            sections = [(route, lo, hi - lo) for route, (lo, hi) in zip(task.routes, task.spans) if hi > lo]
            assert sorted(reads) == sorted(sections) and len(task.spans) == len(task.routes)
        return [write_shard(task) for task in batch]

    manifest = shard_dataset(str(tree), str(out), partitions=2, shard_size=3, seed=4, window=4, map_shards=write)
    assert seen >= {"s-", "r-", "k-"} and not (out / "_plan").exists()
    assert sum(s["samples"] for s in manifest["shards"]) == manifest["num_samples"] > 0


def test_a_seed_decides_the_order_and_the_window_the_shards(tree, tmp_path):
    def run(tag, **kw):
        out = tmp_path / tag
        return _dataset(out, shard_dataset(str(tree), str(out), shard_size=3, **kw))

    first = run("s1", seed=1, window=4)
    assert run("s1-again", seed=1, window=4) == first
    assert run("s2", seed=2, window=4)["bytes"] != first["bytes"]
    wide = run("w12", seed=1, window=12)
    assert wide["bytes"] != first["bytes"] and wide["skipped"] == first["skipped"]


def _release(gate: Path, out: Path, seen: dict, stop: threading.Event, timeout: float = 120.0) -> None:
    """Open the FIFO for writing (letting its scan go on) once a shard file is in `out`, or after `timeout`;
    records whether a shard was there first."""
    deadline = time.monotonic() + timeout
    while not stop.is_set():
        if "shard" not in seen and (any(out.glob("*.tar")) or time.monotonic() > deadline):
            seen["shard"] = sorted(p.name for p in out.glob("*.tar"))
        if "shard" in seen:
            try:
                os.close(os.open(gate, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO until the scan opens it
                seen["released"] = True
                return
            except OSError:
                pass
        time.sleep(0.02)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_shard_is_written_before_the_last_folder_is_scanned(tmp_path, workers):
    root = tmp_path / "tree"
    _write_tree(root, gate=True)
    out = tmp_path / "out"
    seen, stop = {}, threading.Event()
    releaser = threading.Thread(target=_release, args=(root / "f" / "zz-gate.jpg", out, seen, stop))
    releaser.start()
    try:
        manifest = shard_dataset(str(root), str(out), shard_size=3, seed=4, window=4, workers=workers)
    finally:
        stop.set()
        releaser.join()
    assert seen.get("released") and seen["shard"], seen  # the scan of f waited for a written shard
    assert set(seen["shard"]) < {s["name"] for s in manifest["shards"]}
    assert {s["path"]: s["kind"] for s in manifest["skipped"]}["f/zz-gate.jpg"] == "unreadable"  # a FIFO


@pytest.mark.timeout(240)
def test_a_run_killed_mid_way_resumes_to_the_same_bytes(tmp_path):
    """`vitpipe shard --window` SIGKILLed while the last folder's scan waits (earlier windows' shards
    written): the re-run takes the scanned folders from their records, keeps the shards written and
    makes the same bytes as a run that never stopped."""
    root = tmp_path / "tree"
    _write_tree(root, gate=True)
    out = tmp_path / "out"
    args = ["--window", "4", "--shard-size", "3", "--seed", "4", "--workers", "1"]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "vitpipe"), "--quiet", "shard", str(root), str(out),
                             *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("*.tar"))) < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the gate holds the scan of f: nothing more is written
        written = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
        assert proc.poll() is None and len(written) >= 4, (written, proc.poll())
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    assert not (out / "manifest.json").exists() and (out / "_plan").exists()
    (root / "f" / "zz-gate.jpg").unlink()
    (root / "f" / "zz-gate.jpg").write_bytes(encode(photo_crops(1, size=(80, 60), seed=99)[0], "JPEG"))
    reference = tmp_path / "ref"
    expected = _dataset(reference, shard_dataset(str(root), str(reference), shard_size=3, seed=4, window=4))
    again = subprocess.run([str(Path(sys.executable).parent / "vitpipe"), "shard", str(root), str(out), *args,
                            "--workers", "2", "--partitions", "3"], cwd=ROOT, capture_output=True, text=True,
                           timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "unit(s) of the source (class folders, tars) taken from their scan records" in again.stdout
    import json

    assert _dataset(out, json.loads((out / "manifest.json").read_text())) == expected
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name in written} == written


def _write_manifest(root: Path, kind: str) -> Path:
    """A manifest of the tree's files (paths relative to it), in listing order: the first 8 records
    with one label ("label": a string in jsonl), every third one after with two (a list)."""
    import csv
    import json

    files = sorted((str(p.relative_to(root.parent)) for p in root.rglob("*") if not p.is_dir()),
                   key=lambda path: (FOLDERS.index(path.split("/")[1]), path))
    labels = [[path.split("/")[1]] + ([f"x{i % 2}"] if i >= 8 and i % 3 == 0 else []) for i, path in enumerate(files)]
    out = root.parent / f"m.{kind}"
    with open(out, "w", newline="") as f:
        if kind == "csv":
            writer = csv.writer(f)
            writer.writerow(["path", "labels"])
            writer.writerows([path, ";".join(names)] for path, names in zip(files, labels))
        else:
            f.writelines(json.dumps({"path": path, "label": names[0]} if i < 8 else {"path": path, "labels": names})
                         + "\n" for i, (path, names) in enumerate(zip(files, labels)))
    return out


def _labels_by_path(out: Path, manifest: dict) -> dict:
    """{path: class names} of every sample; a multi-label dataset's samples have no .cls member."""
    import json

    found = {}
    for shard in manifest["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            assert manifest["multi_label"] is not any(m.name.endswith(".cls") for m in tar.getmembers()), shard
            for meta in (json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")):
                found[meta["path"]] = meta["classes"]
    return found


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_a_manifest_gives_the_same_dataset_for_any_partitions_and_workers(tree, tmp_path, monkeypatch, kind):
    """A multi-label manifest (jsonl: units of whole lines, here ~200 bytes each; csv: one unit) with
    --window: the same bytes for any partitions and workers, and the global plan's class list,
    multi-label flag, labels and skipped records, though its first unit has one label per record."""
    from shards import partitions

    monkeypatch.setattr(partitions, "_MANIFEST_BLOCK", 200)
    source = str(_write_manifest(tree, kind))
    runs, manifests = {}, {}
    for p, w in ((1, 1), (2, 1), (3, 2)):
        out = tmp_path / f"p{p}w{w}"
        manifests[p, w] = shard_dataset(source, str(out), partitions=p, workers=w, shard_size=3, seed=4, window=4)
        runs[p, w] = _dataset(out, manifests[p, w])
    assert [key for key, got in runs.items() if got != runs[1, 1]] == []
    whole = shard_dataset(source, str(tmp_path / "global"), shard_size=3, seed=4)
    windowed = manifests[1, 1]
    assert windowed["multi_label"] is whole["multi_label"] is True
    assert windowed["classes"] == whole["classes"] == sorted(set(FOLDERS) | {"x0", "x1"})
    assert windowed["label_histogram"] == whole["label_histogram"]
    assert windowed["source"] == whole["source"]
    assert ({(s["path"], s["kind"]) for s in windowed["skipped"]} == {(s["path"], s["kind"]) for s in whole["skipped"]}
            == {("tree/e/dup.jpg", "duplicate_exact"), ("tree/d/dup-in.jpg", "duplicate_exact")})
    labels = _labels_by_path(tmp_path / "p1w1", windowed)
    assert labels == _labels_by_path(tmp_path / "global", whole) and len(labels) == 25
    assert any(len(names) == 2 for names in labels.values())
    if kind == "jsonl":  # windows of a few lines each: a shard holds the records of one window
        assert len(windowed["shards"]) > len(whole["shards"]) and runs[1, 1]["bytes"] != _dataset(
            tmp_path / "global", whole)["bytes"]
    index = tmp_path / "classes.txt"  # --classes: its list, the records of other classes skipped as without
    index.write_text("f\nc\nx1\n")
    only = shard_dataset(source, str(tmp_path / "listed"), shard_size=3, seed=4, window=4, classes=str(index))
    whole = shard_dataset(source, str(tmp_path / "listed-global"), shard_size=3, seed=4, classes=str(index))
    assert only["classes"] == ["f", "c", "x1"] and only["label_histogram"] == whole["label_histogram"]
    assert {s["path"] for s in only["skipped"] if s["kind"] == "unknown_class"} == {
        s["path"] for s in whole["skipped"] if s["kind"] == "unknown_class"} != set()


def test_a_manifest_shard_is_written_before_the_last_block_is_scanned(tmp_path, monkeypatch):
    from shards import partitions

    monkeypatch.setattr(partitions, "_MANIFEST_BLOCK", 200)
    root = tmp_path / "tree"
    _write_tree(root, gate=True)
    source = _write_manifest(root, "jsonl")
    assert source.read_text().splitlines()[-1].startswith('{"path": "tree/f/zz-gate.jpg"')
    out = tmp_path / "out"
    seen, stop = {}, threading.Event()
    releaser = threading.Thread(target=_release, args=(root / "f" / "zz-gate.jpg", out, seen, stop))
    releaser.start()
    try:
        manifest = shard_dataset(str(source), str(out), shard_size=3, seed=4, window=4, workers=2)
    finally:
        stop.set()
        releaser.join()
    assert seen.get("released") and seen["shard"], seen  # the scan of the last block waited for a written shard
    assert set(seen["shard"]) < {s["name"] for s in manifest["shards"]}
    assert {s["path"]: s["kind"] for s in manifest["skipped"]}["tree/f/zz-gate.jpg"] == "unreadable"


def test_bad_window_settings_say_what_to_do(tree, tmp_path):
    from shards import ShardError, ShardSettingsError

    with pytest.raises(ShardSettingsError, match=r"^window=0: must be >= 1 record$"):
        shard_dataset(str(tree), str(tmp_path / "o1"), window=0)
    with pytest.raises(ShardSettingsError, match="--dedup-within near .* use it without --window"):
        shard_dataset(str(tree), str(tmp_path / "o2"), window=4, dedup_within="near")
    (tmp_path / "m.jsonl").write_text('{"path": "a.jpg", "label": "x"}\n{"path": "b.jpg"}\n')
    with pytest.raises(ShardError, match=r"m.jsonl:2: 'labels' must be a list of class names$"):
        shard_dataset(str(tmp_path / "m.jsonl"), str(tmp_path / "o3"), window=4)  # before any window is planned
    assert not any((tmp_path / name / "manifest.json").exists() for name in ("o1", "o2", "o3"))


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_the_same_bytes_on_a_dask_cluster(tree, tmp_path):
    """Windows planned and written by a real `dask scheduler` + 2 `dask worker` processes: the bytes
    of one process."""
    from shards.workers import LoopbackCluster

    expected = _dataset(tmp_path / "one", shard_dataset(str(tree), str(tmp_path / "one"), shard_size=3, seed=4,
                                                        window=4))
    with LoopbackCluster(2, log_dir=str(tmp_path)) as cluster:
        out = tmp_path / "dask"
        assert _dataset(out, shard_dataset(str(tree), str(out), shard_size=3, seed=4, window=4, partitions=3,
                                           dask=cluster.address)) == expected


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_s3_class_folders_tars_and_a_manifest_give_the_local_windows(s3, tree, tmp_path, monkeypatch):
    """Windows of S3 key prefixes (the classes from the prefixes, before any is listed), of a folder
    of per-synset tars and of a jsonl manifest's lines, local and on S3 (real SeaweedFS): the same shards."""
    from shards import partitions, storage

    def run(source, out, **kw):
        return shard_dataset(source, out, shard_size=3, seed=4, window=4, **kw)

    storage.copy_tree(str(tree), s3.url("windows/tree"))
    local = run(str(tree), str(tmp_path / "a"))
    assert run(s3.url("windows/tree"), str(tmp_path / "b"), workers=2)["shards"] == local["shards"]
    tars = tmp_path / "tars"
    tars.mkdir()
    for folder in sorted(p for p in tree.iterdir() if p.is_dir()):
        with tarfile.open(tars / f"n{FOLDERS.index(folder.name)}.tar", "w") as tar:
            for image in sorted(folder.iterdir()):
                tar.add(image, arcname=image.name)
    storage.copy_tree(str(tars), s3.url("windows/tars"))
    local_tars = run(str(tars), str(tmp_path / "c"))
    from_s3 = run(s3.url("windows/tars"), s3.url("windows/out"), workers=2, partitions=3)
    assert from_s3["shards"] == local_tars["shards"] and from_s3["classes"] == [f"n{i}" for i in range(6)]
    assert {s["kind"] for s in from_s3["skipped"]} == {"duplicate_exact"} and len(local_tars["shards"]) > 6
    manifest = _write_manifest(tree, "jsonl")  # a manifest on S3, its images beside it: the local windows
    storage.write_bytes(s3.url("windows/m.jsonl"), manifest.read_bytes())
    monkeypatch.setattr(partitions, "_MANIFEST_BLOCK", 200)
    local_manifest = run(str(manifest), str(tmp_path / "d"))
    assert len(local_manifest["shards"]) > 6 and local_manifest["multi_label"]
    assert run(s3.url("windows/m.jsonl"), str(tmp_path / "e"), workers=2)["shards"] == local_manifest["shards"]


def _tars(tree: Path, out: Path) -> Path:
    """A folder of per-synset tars n0.tar..n5.tar, one per class folder of the tree."""
    out.mkdir()
    for i, name in enumerate(FOLDERS):
        with tarfile.open(out / f"n{i}.tar", "w") as tar:
            for image in sorted((tree / name).iterdir()):
                tar.add(image, arcname=image.name)
    return out


@pytest.mark.parametrize("kind", ["folders", "tars"])
def test_each_unit_is_listed_once(tree, tmp_path, monkeypatch, kind):
    """With --window the listing that closes a window (a class folder's, a tar's index) is the one
    its scan uses: list_unit is called once per unit (a manifest's units are listed twice: see
    shards.windows)."""
    from collections import Counter

    from shards import partitions

    source = tree if kind == "folders" else _tars(tree, tmp_path / "tars")
    calls, list_unit = Counter(), partitions.list_unit
    monkeypatch.setattr(partitions, "list_unit", lambda kind, url, unit, **kw: calls.update([repr(unit)])
                        or list_unit(kind, url, unit, **kw))
    manifest = shard_dataset(str(source), str(tmp_path / "out"), shard_size=3, seed=4, window=4)
    assert len(manifest["shards"]) > 6 and manifest["num_samples"] == 25
    units = partitions.split_source(str(source)).partitions[0].units
    assert len(units) == 7 if kind == "folders" else 6
    assert calls == Counter(repr(unit) for unit in units)


@pytest.mark.timeout(240)
def test_strict_names_the_record_and_a_re_run_keeps_the_written_shards(tmp_path):
    """`vitpipe shard --window --strict` with a bad file in the last window: one line naming the file
    and why, saying the earlier windows' shards are kept; with the file removed a re-run keeps those
    shards and makes the bytes of a clean run."""
    import json

    root = tmp_path / "tree"
    for i, crop in enumerate(photo_crops(12, size=(96, 72), seed=3)):
        (root / "abc"[i // 4]).mkdir(parents=True, exist_ok=True)
        (root / "abc"[i // 4] / f"{i:02d}.jpg").write_bytes(encode(crop, "JPEG", quality=90))
    bad = root / "c" / "bad.jpg"
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    args = [str(Path(sys.executable).parent / "vitpipe"), "--quiet", "shard", str(root), str(out), "--window", "4",
            "--shard-size", "3", "--seed", "4", "--workers", "2", "--strict"]
    failed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert failed.returncode == 2, failed.stdout + failed.stderr
    assert failed.stderr.count("\n") == 1 and f"{root}: c/bad.jpg: not an image (" in failed.stderr, failed.stderr
    assert "window of units 3..3 of 4" in failed.stderr and "the 4 shard(s) of the windows before it are written, " \
        "complete and kept" in failed.stderr and "re-run without --strict" in failed.stderr, failed.stderr
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert len(written) == 4 and not (out / "manifest.json").exists()  # folders a and b: 2 shards each
    bad.unlink()
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr
    reference = tmp_path / "ref"
    expected = _dataset(reference, shard_dataset(str(root), str(reference), shard_size=3, seed=4, window=4,
                                                    strict=True))
    assert _dataset(out, json.loads((out / "manifest.json").read_text())) == expected
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name in written} == written
