"""The shard writer's own parts: chunks of samples laid
out in one buffer (images larger than a chunk, metadata longer than a block), files that grew."""
from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import tarfile
import threading

import pytest

from shards import ShardError, plan_shards, shard_dataset, write_shard
from shards.table import RecordTable, keys_of_paths, make_key
from shards.testdata import encode, photo_crops


def test_keys_of_paths_equals_make_key_per_path():
    rng = random.Random(1)
    pieces = ["a", "B", ".", "/", " ", "_", "\\", "\t", "é", "日", "x.y", "..", "\x01", "-", "\u2028"]
    for _ in range(2000):
        paths = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))) for _ in range(rng.randint(1, 6))]
        assert keys_of_paths(paths) == [make_key(p) for p in paths]


def test_a_record_table_extended_by_another_equals_one_appended_row_by_row():
    """RecordTable.extend (how parts listed in worker processes are merged) against append, over
    random mixes of derived and stored keys, one and several labels, whole files and tar members."""
    rng = random.Random(3)

    def rows(n):
        return [dict(key=rng.choice([None, f"k{rng.randint(0, 9)}"]), root=rng.choice(["/r", "/t/a.tar", "s3://b/x"]),
                     path=rng.choice(["a/1.jpg", "é/2.png", "c d/3.jpg"]),
                     labels=tuple(rng.sample(["x", "y", "zé"], rng.choice([1, 1, 2, 3]))),
                     **rng.choice([{}, {"offset": rng.randint(0, 10 ** 6), "length": rng.randint(0, 999)}]))
                for _ in range(n)]

    def table(rows_):
        out = RecordTable()
        for row in rows_:
            out.append(**row)
        return out

    for _ in range(300):
        first, second = rows(rng.randint(0, 4)), rows(rng.randint(0, 4))
        merged = table(first)
        merged.extend(table(second))
        expected = table(first + second)
        assert [merged.ref(i) for i in range(len(merged))] == [expected.ref(i) for i in range(len(expected))]


def test_chunks_hold_images_larger_than_a_chunk_and_metadata_longer_than_a_block(tmp_path, monkeypatch):
    """Small chunks (3 samples, 1 KB of images) so that a shard spans many of them, one PNG larger
    than a chunk, and class names that make the json member several blocks long."""
    from shards import writer

    monkeypatch.setattr(writer, "_CHUNK_SAMPLES", 3)
    monkeypatch.setattr(writer, "_CHUNK_BYTES", 1024)
    crops = photo_crops(11, size=(64, 48), seed=5)
    rows = []
    for i, crop in enumerate(crops):
        name = f"img{i}.{'png' if i == 4 else 'jpg'}"
        image = crop.resize((400, 300)) if i == 4 else crop
        (tmp_path / "src").mkdir(exist_ok=True)
        (tmp_path / "src" / name).write_bytes(encode(image, "PNG" if i == 4 else "JPEG"))
        rows.append({"path": f"src/{name}", "labels": ["L" * 700, f"class {i % 3}"][: 1 + i % 2]})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (tmp_path / "src" / "img4.png").stat().st_size > 1024 * 3
    manifest = shard_dataset(str(tmp_path / "m.jsonl"), str(tmp_path / "out"), shard_size=8)
    seen = {}
    for shard in manifest["shards"]:
        with tarfile.open(tmp_path / "out" / shard["name"]) as tar:
            for member in tar.getmembers():
                seen[member.name] = tar.extractfile(member).read()
    assert len(seen) == 2 * 11
    for i in range(11):
        meta = json.loads(seen[f"src_img{i}.json"])
        assert meta["classes"] == sorted(set(rows[i]["labels"]), key=[*manifest["classes"]].index)
        ext = "png" if i == 4 else "jpg"
        assert seen[f"src_img{i}.{ext}"] == (tmp_path / "src" / f"img{i}.{ext}").read_bytes()
    assert len(seen["src_img0.json"]) > 512


def test_a_file_that_changed_after_planning_stops_its_shard(tmp_path):
    for i, crop in enumerate(photo_crops(3, size=(40, 30), seed=2)):
        (tmp_path / "src" / "c").mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / "c" / f"{i}.jpg").write_bytes(encode(crop, "JPEG"))
    plan = plan_shards(str(tmp_path / "src"), str(tmp_path / "out"), shard_size=10)
    path = tmp_path / "src" / "c" / "1.jpg"
    data = path.read_bytes()
    for changed, now in ((data + b"\0" * 10, len(data) + 10), (data[:-7], len(data) - 7)):
        path.write_bytes(changed)
        with pytest.raises(ShardError, match=rf"^c/1\.jpg: changed since it was scanned \({len(data)} -> {now} bytes\)"):
            write_shard(plan, 0)
    path.unlink()
    with pytest.raises(ShardError, match=r"^c/1\.jpg: unreadable while writing data-000000\.tar \(.*not found"):
        write_shard(plan, 0)
    assert not list((tmp_path / "out").glob("*.tar")) and not list((tmp_path / "out").glob(".*"))


def test_hashing_in_a_thread_writes_the_same_shard(tmp_path, monkeypatch):
    """With HASH_IN_THREAD each chunk is hashed in a thread while the next one is read into the
    other buffer: the same bytes and sha256 as hashing inline, over many small chunks; and a shard
    stopped by an error leaves no thread and no file behind."""
    from shards import writer

    monkeypatch.setattr(writer, "_CHUNK_SAMPLES", 2)
    for i, crop in enumerate(photo_crops(9, size=(48, 40), seed=8)):
        (tmp_path / "src" / "c").mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / "c" / f"{i}.jpg").write_bytes(encode(crop, "JPEG"))
    written = {}
    for threaded in (False, True):
        monkeypatch.setattr(writer, "HASH_IN_THREAD", threaded)
        plan = plan_shards(str(tmp_path / "src"), str(tmp_path / f"out{threaded}"), shard_size=20)
        entry = write_shard(plan, 0)
        data = (tmp_path / f"out{threaded}" / entry["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        written[threaded] = data
    assert written[True] == written[False]
    threads = threading.active_count()
    # else the complete shard is kept (the plan's route files in _plan stay: the task reads them)
    (tmp_path / "outTrue" / entry["name"]).unlink()
    shutil.rmtree(tmp_path / "outTrue" / "_progress")
    (tmp_path / "src" / "c" / "7.jpg").write_bytes(b"changed")
    with pytest.raises(ShardError, match="changed since it was scanned"):
        write_shard(plan, 0)
    assert threading.active_count() == threads and not list((tmp_path / "outTrue").glob(".*.partial"))


def test_a_full_disk_stops_the_shard_command_with_one_line_and_nothing_half_written(tmp_path, small_disk):
    """Used to be an `OSError: [Errno 28]` traceback raised in a worker."""
    import subprocess
    import sys
    from pathlib import Path

    for i, crop in enumerate(photo_crops(40, size=(160, 120), seed=21)):  # ~400 KB of JPEGs for a 256 KiB disk
        (tmp_path / "src" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / f"c{i % 2}" / f"{i}.jpg").write_bytes(encode(crop, "JPEG", quality=95))
    out = small_disk / "out"
    proc = subprocess.run([str(Path(sys.executable).parent / "vitpipe"), "shard", str(tmp_path / "src"), str(out),
                           "--shard-size", "5", "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("vitpipe")]
    # the shard being written, or the completion record of one just published
    assert re.fullmatch(rf"vitpipe shard: error: {out}/(data-0000\d\d\.tar|_progress/data-0000\d\d\.json): "
                        "cannot write: no space left on the device; free space or write elsewhere", line), line
    left = sorted(p.name for p in out.iterdir())
    assert "manifest.json" not in left and not [name for name in left if name.endswith(".partial")], left
    assert [name for name in left if name.endswith(".tar")]
    for name in left:  # every shard published is whole
        if name.endswith(".tar"):
            with tarfile.open(out / name) as tar:
                assert len(tar.getnames()) == 3 * 5
