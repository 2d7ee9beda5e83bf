"""The plan made partition by partition (shards.partplan): duplicates, near duplicates, colliding
keys, excluded and unknown-class records across partitions give the same dataset, byte for
byte, for any number of partitions and workers; the coordinator's plan holds no record rows."""
from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from shards import plan_shards, shard_dataset
from shards.testdata import encode, photo_crops


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("partplan") / "tree"
    crops = photo_crops(16, size=(96, 72), seed=11)
    files = {f"{['a b', 'a_b', 'c', 'd'][i % 4]}/{i:02d}.jpg": encode(crop, "JPEG", quality=90)
             for i, crop in enumerate(crops[:14])}
    files.update({
        # keys that collide across folders: "a b/x.jpg" and "a_b/x.jpg" are both a_b_x
        "a b/x.jpg": encode(crops[14], "PNG"), "a_b/x.jpg": encode(crops[15], "PNG"),
        # an exact duplicate in a later folder, a near one (re-encoded smaller), a bad file, an excluded image
        "d/dup.jpg": files["a b/00.jpg"], "c/near.jpg": encode(crops[1].resize((64, 48)), "JPEG", quality=70),
        "c/bad.jpg": b"\xff\xd8\xff\xe0 not really", "../eval/e/same.jpg": files["a_b/05.jpg"]})
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _dataset(out: Path, manifest: dict) -> dict:
    return {"shards": manifest["shards"], "skipped": manifest["skipped"], "dropped": manifest["dropped"],
            "histogram": manifest["label_histogram"], "fingerprint": manifest["fingerprint"],
            "bytes": {s["name"]: (out / s["name"]).read_bytes() for s in manifest["shards"]}}


@pytest.mark.parametrize("settings", [
    {"shard_size": 4, "dedup_within": "near"},
    {"shard_size": 50, "max_shard_bytes": 64 * 1024, "exclude": "EVAL"},
    {"shard_size": 3, "classes": "CLASSES"},
], ids=["near", "bytes+exclude", "classes"])
def test_the_same_dataset_for_any_partitions_and_workers(tree, tmp_path, settings):
    settings = dict(settings, seed=3)
    if settings.get("exclude") == "EVAL":
        settings["exclude"] = str(tree.parent / "eval")
    if settings.get("classes") == "CLASSES":
        (tmp_path / "classes.txt").write_text("c\na b\nd\n")  # a_b is not in it: its records are unknown
        settings["classes"] = str(tmp_path / "classes.txt")
    runs = {}
    for partitions, workers in ((1, 1), (2, 1), (3, 2), (5, 2)):
        out = tmp_path / f"p{partitions}w{workers}"
        runs[partitions, workers] = _dataset(out, shard_dataset(str(tree), str(out), partitions=partitions,
                                                                workers=workers, **settings))
        assert not (out / "_plan").exists()
    reference = runs[1, 1]
    for key, got in runs.items():
        assert got == reference, key
    kinds = {s["path"]: s["kind"] for s in reference["skipped"]}
    assert kinds["c/bad.jpg"] in ("corrupt_image", "not_an_image")
    if "classes" in settings:
        assert sum(kind == "unknown_class" for kind in kinds.values()) == 5  # a_b's 4 crops and x.jpg
    else:
        assert kinds["d/dup.jpg"] == "duplicate_exact"
    if settings.get("dedup_within") == "near":
        assert kinds["c/near.jpg"] == "duplicate_near"
    if "exclude" in settings:
        assert kinds["a_b/05.jpg"] == "excluded_exact"
        assert all(s["bytes"] <= 64 * 1024 for s in reference["shards"]) and len(reference["shards"]) > 1
    # every sample key is unique: the colliding ones got a hash of their path
    names = []
    for shard in reference["shards"]:
        with tarfile.open(tmp_path / "p1w1" / shard["name"]) as tar:
            names += [m.name.rsplit(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".json")]
    assert len(names) == len(set(names)) == sum(s["samples"] for s in reference["shards"])
    if "classes" not in settings:
        assert "a_b_x" in names and any(name.startswith("a_b_x_") for name in names)


def test_buckets_read_in_ranges_by_several_jobs_give_the_same_dataset(tree, tmp_path, monkeypatch):
    """A large source's buckets are split over jobs that each read a range of every state file: the
    duplicates and colliding keys they find are those of one job over all buckets."""
    from shards import partplan

    one = shard_dataset(str(tree), str(tmp_path / "one"), partitions=1, shard_size=4, seed=3)
    monkeypatch.setattr(partplan, "_BUCKET_ROWS", 4)  # 22 records: a job per bucket
    jobs = []
    monkeypatch.setattr(partplan, "_bucket_job", lambda job, real=partplan._bucket_job: jobs.append(job[:2]) or real(job))
    many = shard_dataset(str(tree), str(tmp_path / "many"), partitions=5, shard_size=4, seed=3)
    assert jobs == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert _dataset(tmp_path / "many", many) == _dataset(tmp_path / "one", one)
    assert {s["kind"] for s in many["skipped"]} >= {"duplicate_exact"}


def test_the_plan_holds_no_record_rows(tree, tmp_path):
    plan = plan_shards(str(tree), str(tmp_path / "out"), shard_size=4, partitions=3)
    assert all(task.records is None and task.routes for task in plan.tasks)
    assert sum(len(task) for task in plan.tasks) == plan.num_samples == 17  # 14 crops, 2 x.jpg, near.jpg
    loaded = plan.tasks[0].loaded()
    assert len(loaded.records) == len(loaded.ext) == 4 == len(plan.tasks[0])


def test_a_plan_cut_short_resumes_with_other_partitions(tree, tmp_path):
    """A coordinator stopped after planning and all shard writes but one (its files left in _plan): the
    re-run with other partitions and workers keeps those shards (their task digests match) and
    makes the same dataset as a run that never stopped."""
    from shards import write_shard

    # shards of 2: some hold records only of partitions without a renamed key, in one cut but not the other
    reference = shard_dataset(str(tree), str(tmp_path / "ref"), shard_size=2, seed=2, partitions=1)
    out = tmp_path / "cut"
    plan = plan_shards(str(tree), str(out), shard_size=2, seed=2, partitions=3)
    for index in range(len(plan.tasks) - 1):
        write_shard(plan, index)
    assert (out / "_plan").exists() and not (out / "manifest.json").exists()
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert len(written) == len(plan.tasks) - 1 == 8
    finished = shard_dataset(str(tree), str(out), shard_size=2, seed=2, partitions=5, workers=2)
    assert finished["shards"] == reference["shards"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name in written} == written
    for shard in reference["shards"]:
        assert (out / shard["name"]).read_bytes() == (tmp_path / "ref" / shard["name"]).read_bytes()


def test_an_empty_jsonl_manifest_says_so(tmp_path):
    from shards import ShardError

    (tmp_path / "m.jsonl").write_bytes(b"")
    with pytest.raises(ShardError, match=r"m\.jsonl: empty manifest \(no records\)$"):
        shard_dataset(str(tmp_path / "m.jsonl"), str(tmp_path / "out"), partitions=3)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_the_plan_files_are_arrays_only(tree, tmp_path):
    """Every file a plan leaves in <out>/_plan mid-run (scan records, partition states, route files)
    is an .npz of .npy arrays that loads with allow_pickle=False; a state file holding a pickled
    array is refused."""
    import zipfile

    import numpy as np
    import pytest

    from shards.partitions import pack_arrays
    from shards.partplan import _load_state

    out = tmp_path / "out"
    plan = plan_shards(str(tree), str(out), shard_size=4, partitions=3, dedup_within="near")
    files = sorted((out / "_plan").iterdir())
    assert {f.name[:2] for f in files} >= {"s-", "r-"} and len(files) >= 7  # 3 states, 3 routes, scan records
    for path in files:
        assert all(name.endswith(".npy") for name in zipfile.ZipFile(path).namelist()), path
        with np.load(path, allow_pickle=False) as data:
            assert all(data[name].dtype != object for name in data.files)
    assert sum(len(task.loaded().records) for task in plan.tasks) == plan.num_samples
    state = next(f for f in files if f.name.startswith("s-"))
    state.write_bytes(pack_arrays({"c_bad": np.array([("bad", "x")], dtype=object)}))
    with pytest.raises(ValueError, match="allow_pickle"):
        _load_state(str(state))
