"""Sharding real image files to a local folder: formats, bad input, determinism, limits, resize,
dedup, class index reuse, read-back with stock webdataset and `tar`, verify, crash + resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from shards import ShardError, shard_dataset
from shards.reader import load_manifest, preflight, shard_urls
from shards.testdata import bomb_png, encode, photo_crops
from shards.verify import verify_dataset

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture(scope="module")
def mixed_tree(tmp_path_factory) -> Path:
    """Class folders with unicode/space names, images in 6 formats, and every kind of broken file."""
    root = tmp_path_factory.mktemp("mixed") / "tree"
    crops = photo_crops(24, size=(96, 72), seed=3)
    formats = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("GIF", "gif"), ("BMP", "bmp"), ("JPEG", "jpeg")]
    classes = ["cat ü", "dog", "émoji 🐟"]
    for i, crop in enumerate(crops):
        fmt, ext = formats[i % len(formats)]
        _write(root / classes[i % 3] / f"img {i:02d}.{ext}", encode(crop, fmt))
    good_jpeg = (root / "cat ü" / "img 00.jpg").read_bytes()
    _write(root / "dog" / "copy of img 00.jpg", good_jpeg)  # exact duplicate inside the source
    _write(root / "dog" / "zero.jpg", b"")
    _write(root / "dog" / "truncated.jpg", good_jpeg[: len(good_jpeg) // 2])
    _write(root / "dog" / "notes.txt", "not an image\n".encode())
    _write(root / "dog" / "bomb.png", bomb_png())
    _write(root / "émoji 🐟" / "corrupt.png", b"\x89PNG\r\n\x1a\n" + os.urandom(300))
    _write(root / "stray.jpg", good_jpeg)  # not inside a class folder
    return root


@pytest.fixture(scope="module")
def mixed_out(mixed_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed-out") / "ds"
    manifest = shard_dataset(str(mixed_tree), str(out), name="mix", shard_size=7, seed=1)
    return out, manifest


def test_manifest_counts_every_skip_with_reason(mixed_out):
    out, manifest = mixed_out
    assert manifest["num_samples"] == 24
    assert manifest["classes"] == ["cat ü", "dog", "émoji 🐟"]
    assert manifest["label_histogram"] == [8, 8, 8]
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert reasons["dog/zero.jpg"].startswith("empty file")
    assert "truncated" in reasons["dog/truncated.jpg"]
    assert reasons["dog/notes.txt"].startswith("not an image")
    assert reasons["dog/bomb.png"].startswith("decompression bomb")
    assert reasons["émoji 🐟/corrupt.png"].startswith(("corrupt", "not an image"))
    assert reasons["dog/copy of img 00.jpg"] == "exact duplicate of cat ü/img 00.jpg"
    assert reasons["stray.jpg"] == "not inside a class folder"
    assert sum(manifest["dropped"].values()) == len(manifest["skipped"]) == 7
    assert [s["samples"] for s in manifest["shards"]] == [7, 7, 7, 3]
    assert load_manifest(out) == json.loads((out / "manifest.json").read_text())


def test_read_back_with_stock_webdataset_and_tar(mixed_out, mixed_tree):
    out, manifest = mixed_out
    samples = list(wds.WebDataset(shard_urls(str(out)), shardshuffle=False))
    assert len(samples) == 24 and len({s["__key__"] for s in samples}) == 24
    exts = set()
    for sample in samples:
        assert "." not in sample["__key__"]
        meta = json.loads(sample["json"])
        image_ext = next(k for k in sample if k in ("jpg", "jpeg", "png", "webp", "gif", "bmp"))
        exts.add(image_ext)
        original = (mixed_tree / meta["path"]).read_bytes()
        assert sample[image_ext] == original  # pass-through: bytes untouched
        assert int(sample["cls"]) == meta["labels"][0] and manifest["classes"][meta["labels"][0]] == meta["classes"][0]
        assert Image.open(mixed_tree / meta["path"]).size == (meta["width"], meta["height"])
    assert exts == {"jpg", "png", "webp", "gif", "bmp"}
    listing = subprocess.run(["tar", "tf", str(out / "mix-000000.tar")], capture_output=True, text=True, check=True)
    names = listing.stdout.splitlines()
    assert len(names) == 21 and names[1].endswith(".cls") and names[2].endswith(".json")
    assert verify_dataset(str(out)) == []


def test_same_input_and_seed_give_byte_identical_shards(mixed_tree, mixed_out, tmp_path):
    out, manifest = mixed_out
    again = shard_dataset(str(mixed_tree), str(tmp_path / "again"), name="mix", shard_size=7, seed=1, workers=2)
    assert again["shards"] == manifest["shards"]
    for shard in manifest["shards"]:
        assert (tmp_path / "again" / shard["name"]).read_bytes() == (out / shard["name"]).read_bytes()
    other = shard_dataset(str(mixed_tree), str(tmp_path / "seed2"), name="mix", shard_size=7, seed=2)
    assert [s["sha256"] for s in other["shards"]] != [s["sha256"] for s in manifest["shards"]]
    assert other["source"]["fingerprint"] == manifest["source"]["fingerprint"]
    assert other["fingerprint"] != manifest["fingerprint"]


def test_strict_turns_skips_into_failure(mixed_tree, tmp_path):
    with pytest.raises(ShardError, match=r"--strict: 7 record\(s\) would be skipped"):
        shard_dataset(str(mixed_tree), str(tmp_path / "strict"), strict=True)
    assert not (tmp_path / "strict" / "manifest.json").exists()


def test_byte_limit_resize_and_class_index_reuse(mixed_tree, mixed_out, tmp_path):
    out, manifest = mixed_out
    limited = shard_dataset(str(mixed_tree), str(tmp_path / "bytes"), max_shard_bytes=64 * 1024)
    assert all(s["bytes"] <= 64 * 1024 for s in limited["shards"]) and len(limited["shards"]) > 1
    small = shard_dataset(str(mixed_tree), str(tmp_path / "small"), resize=32, quality=80, classes=str(out))
    for sample in wds.WebDataset(shard_urls(str(tmp_path / "small")), shardshuffle=False).decode("pil"):
        meta = sample["json"]
        image = next(v for k, v in sample.items() if isinstance(v, Image.Image))
        assert min(image.size) == 32 and image.size == (meta["width"], meta["height"])  # 96x72 -> 43x32
    assert small["classes"] == manifest["classes"]
    (tmp_path / "classes.txt").write_text("dog\ncat ü\n")
    reused = shard_dataset(str(mixed_tree), str(tmp_path / "reuse"), classes=str(tmp_path / "classes.txt"))
    assert reused["classes"] == ["dog", "cat ü"] and reused["label_histogram"] == [8, 8]
    assert reused["dropped"]["unknown_class"] == 8


def test_exclude_drops_exact_and_near_duplicates_of_eval_set(mixed_tree, tmp_path):
    crops = photo_crops(24, size=(96, 72), seed=3)
    eval_root = tmp_path / "eval"
    _write(eval_root / "x" / "same.jpg", (mixed_tree / "cat ü" / "img 00.jpg").read_bytes())
    # img 01.png re-encoded as a smaller JPEG: a near duplicate, different bytes
    _write(eval_root / "x" / "resized.jpg", encode(crops[1].resize((64, 48)), "JPEG", quality=70))
    _write(eval_root / "x" / "unrelated.jpg", encode(photo_crops(1, size=(96, 72), seed=99)[0], "JPEG"))
    manifest = shard_dataset(str(mixed_tree), str(tmp_path / "dedup"), exclude=[str(eval_root)])
    kinds = {s["path"]: s["kind"] for s in manifest["skipped"]}
    assert kinds["cat ü/img 00.jpg"] == "excluded_exact"
    assert kinds["dog/img 01.png"] == "excluded_near"
    assert manifest["num_samples"] == 22 and manifest["dropped"]["excluded_exact"] == 2
    # the copy inside the source matches the evaluation image too
    assert kinds["dog/copy of img 00.jpg"] == "excluded_exact"


def test_jsonl_and_csv_multilabel_with_relative_paths(tmp_path):
    crops = photo_crops(6, size=(64, 48), seed=5)
    for i, crop in enumerate(crops):
        _write(tmp_path / "imgs" / f"p {i}.jpg", encode(crop, "JPEG"))
    rows = [{"path": f"imgs/p {i}.jpg", "labels": ["a", "b"] if i % 2 else ["c"]} for i in range(6)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    manifest = shard_dataset(str(tmp_path / "m.jsonl"), str(tmp_path / "out-jsonl"), shard_size=4)
    assert manifest["multi_label"] and manifest["classes"] == ["a", "b", "c"] and manifest["label_histogram"] == [3, 3, 3]
    samples = list(wds.WebDataset(shard_urls(str(tmp_path / "out-jsonl")), shardshuffle=False))
    assert len(samples) == 6 and all("cls" not in s for s in samples)
    assert sorted(tuple(json.loads(s["json"])["classes"]) for s in samples) == [("a", "b")] * 3 + [("c",)] * 3
    lines = ["path,labels"] + [f"imgs/p {i}.jpg,{'a;b' if i % 2 else 'c'}" for i in range(6)]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    via_csv = shard_dataset(str(tmp_path / "m.csv"), str(tmp_path / "out-csv"), shard_size=4)
    assert via_csv["label_histogram"] == manifest["label_histogram"] and via_csv["source"]["kind"] == "csv"


def test_a_manifest_row_with_an_unsupported_url_names_the_file_line_and_url(tmp_path):
    """A `gs://` path in a jsonl source used to be taken as a path relative to the manifest."""
    _write(tmp_path / "imgs" / "a.jpg", encode(photo_crops(1, size=(32, 24), seed=5)[0], "JPEG"))
    rows = [{"path": "imgs/a.jpg", "labels": ["a"]}, {"path": "gs://bucket/b.jpg", "labels": ["b"]}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ShardError) as err:
        shard_dataset(str(tmp_path / "m.jsonl"), str(tmp_path / "out"))
    assert str(err.value) == (f"{tmp_path}/m.jsonl:2: gs://bucket/b.jpg: 'gs://' URLs are not supported; write a local "
                              "path or s3://BUCKET/PREFIX (another S3-compatible store: set AWS_ENDPOINT_URL)")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def _tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    import io

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def test_i21k_tars_folder_and_tar_of_tars_refuse_unsafe_members(tmp_path):
    crops = photo_crops(6, size=(64, 48), seed=7)
    link = tarfile.TarInfo("evil_link.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    device = tarfile.TarInfo("dev.jpg")
    device.type = tarfile.CHRTYPE
    syn_a = _tar_bytes([_file(f"n0001_{i}.JPEG", encode(c, "JPEG")) for i, c in enumerate(crops[:3])]
                       + [_file("../escape.jpg", encode(crops[0], "PNG")), _file("/abs.jpg", encode(crops[1], "PNG")),
                          (link, None), (device, None)])
    syn_b = _tar_bytes([_file(f"n0002_{i}.JPEG", encode(c, "JPEG")) for i, c in enumerate(crops[3:])])
    _write(tmp_path / "tars" / "n0001.tar", syn_a)
    _write(tmp_path / "tars" / "n0002.tar", syn_b)
    _write(tmp_path / "tars" / "n0001b.txt", b"notes")
    manifest = shard_dataset(str(tmp_path / "tars"), str(tmp_path / "out"), format="i21k-tars")
    assert manifest["source"]["kind"] == "i21k-tars" and manifest["classes"] == ["n0001", "n0002"]
    assert manifest["num_samples"] == 6 and manifest["dropped"] == {"unsafe_tar_member": 4, "not_a_per-synset_tar": 1}
    # indexed by 2 worker processes (a tar each) and merged in listing order: the same dataset
    parallel = shard_dataset(str(tmp_path / "tars"), str(tmp_path / "out-2"), workers=2, format="i21k-tars")
    assert [(s["path"], s["reason"]) for s in parallel["skipped"]] == [(s["path"], s["reason"]) for s in manifest["skipped"]]
    assert parallel["shards"] == manifest["shards"]
    written = [m for url in shard_urls(str(tmp_path / "out")) for m in tarfile.open(url).getnames()]
    assert not any(".." in n or n.startswith("/") or "evil" in n or "dev" in n for n in written)
    outer = _tar_bytes([_file("n0001.tar", syn_a), _file("readme.txt", b"x"), _file("n0002.tar", syn_b)])
    _write(tmp_path / "winter21.tar", outer)
    nested = shard_dataset(str(tmp_path / "winter21.tar"), str(tmp_path / "out-nested"))
    assert [s["sha256"] for s in nested["shards"]] == [s["sha256"] for s in manifest["shards"]]
    # the inner tars indexed where they lie, by 2 worker processes: the same dataset
    nested2 = shard_dataset(str(tmp_path / "winter21.tar"), str(tmp_path / "out-nested-2"), workers=2)
    assert nested2["shards"] == nested["shards"] and nested2["skipped"] == nested["skipped"]
    assert nested2["dropped"] == {"unsafe_tar_member": 4, "not_a_per-synset_tar": 1}
    assert [s["path"] for s in nested2["skipped"]].index("readme.txt") == 4  # after n0001.tar's, before n0002.tar's


def test_one_line_errors_for_bad_sources(tmp_path):
    with pytest.raises(ShardError, match="source not found"):
        shard_dataset(str(tmp_path / "nope"), str(tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="empty source"):
        shard_dataset(str(tmp_path / "empty"), str(tmp_path / "o"))
    _write(tmp_path / "tree" / "a" / "x.png", encode(photo_crops(1, size=(32, 32))[0], "PNG"))
    (tmp_path / "tree" / "b").mkdir()
    with pytest.raises(ShardError, match=r"tree/b: class folder has no images"):
        shard_dataset(str(tmp_path / "tree"), str(tmp_path / "o"))
    _write(tmp_path / "flat" / "x.dat", b"123")
    with pytest.raises(ShardError, match="unknown source format"):
        shard_dataset(str(tmp_path / "flat"), str(tmp_path / "o"))
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_verify_names_tampered_and_missing_shards(mixed_out, tmp_path, capsys):
    import shutil

    out, manifest = mixed_out
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    data = bytearray((copy / "mix-000001.tar").read_bytes())
    data[2000] ^= 0xFF
    (copy / "mix-000001.tar").write_bytes(bytes(data))
    (copy / "mix-000003.tar").unlink()
    problems = verify_dataset(str(copy))
    assert any(p.startswith("mix-000001.tar: sha256 mismatch") for p in problems)
    assert any(p.startswith("mix-000003.tar: missing") for p in problems)
    assert not any(p.startswith(("mix-000000", "mix-000002")) for p in problems)
    from pipeline.cli import main

    assert main(["verify", str(copy)]) == 1
    assert "mix-000001.tar: sha256 mismatch" in capsys.readouterr().err


def test_preflight_says_when_ddp_would_hang(digits_shards):
    assert preflight(digits_shards, world_size=2, workers_per_rank=2).ok
    report = preflight(digits_shards, world_size=4, workers_per_rank=4)
    assert not report.ok and "9 shard(s) < 4 rank(s) x 4 worker(s)" in report.message and "--shard-size" in report.message


_KILL_SCRIPT = """
import os, signal, sys
from shards import shard_dataset
done = []
def hook(entry):
    done.append(entry)
    if len(done) == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
shard_dataset(sys.argv[1], sys.argv[2], name="digits", shard_size=150, seed=4, on_shard_done=hook)
"""


@pytest.mark.timeout(120)
def test_killed_writer_rerun_completes_identically(digits_tree, tmp_path):
    reference = shard_dataset(str(digits_tree), str(tmp_path / "ref"), name="digits", shard_size=150, seed=4)
    crashed = tmp_path / "crashed"
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(digits_tree), str(crashed), "3"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert not (crashed / "manifest.json").exists()
    assert sorted(p.name for p in crashed.glob("*.tar")) == ["digits-000000.tar", "digits-000001.tar", "digits-000002.tar"]
    first = {p.name: p.stat().st_mtime_ns for p in crashed.glob("*.tar")}
    finished = shard_dataset(str(digits_tree), str(crashed), name="digits", shard_size=150, seed=4, workers=2)
    assert finished["shards"] == reference["shards"]
    for shard in reference["shards"]:
        assert (crashed / shard["name"]).read_bytes() == (tmp_path / "ref" / shard["name"]).read_bytes()
    assert all((crashed / n).stat().st_mtime_ns == t for n, t in first.items()), "complete shards must be kept"
    assert not list(crashed.glob(".*.partial"))


def test_a_cut_short_progress_record_means_that_shard_is_rewritten(digits_tree, tmp_path):
    """Progress records are not fsynced; one emptied or cut short (a power loss) only costs a rewrite."""
    out = tmp_path / "out"
    reference = shard_dataset(str(digits_tree), str(out), name="digits", shard_size=150, seed=4)
    (out / "manifest.json").unlink()
    (out / "_progress" / "digits-000001.json").write_bytes(b'{"name": "digits-0000')
    (out / "_progress" / "digits-000002.json").write_bytes(b"")
    kept = {n: (out / n).stat().st_mtime_ns for n in ("digits-000000.tar", "digits-000003.tar")}
    os.utime(out / "digits-000001.tar", ns=(1, 1))
    finished = shard_dataset(str(digits_tree), str(out), name="digits", shard_size=150, seed=4)
    assert finished["shards"] == reference["shards"]
    assert all((out / n).stat().st_mtime_ns == t for n, t in kept.items())
    assert (out / "digits-000001.tar").stat().st_mtime_ns != 1  # rewritten
    assert json.loads((out / "_progress" / "digits-000002.json").read_text())["sha256"] == reference["shards"][2]["sha256"]


def test_exclude_accepts_a_dataset_and_a_list_file(mixed_tree, mixed_out, tmp_path):
    out, _ = mixed_out
    with pytest.raises(ShardError, match=r"no usable images \(31 skipped"):
        shard_dataset(str(mixed_tree), str(tmp_path / "all-excluded"), exclude=str(out), near_dup_threshold=0)
    (tmp_path / "eval.txt").write_text(f"{mixed_tree}/dog/img 04.bmp\n# a comment\n")
    manifest = shard_dataset(str(mixed_tree), str(tmp_path / "one-excluded"), exclude=str(tmp_path / "eval.txt"),
                             near_dup_threshold=0)
    assert manifest["num_samples"] == 23 and manifest["dropped"]["excluded_exact"] == 1


def test_cli_dedup_within_near_drops_resized_copies_inside_the_source(tmp_path, capsys, monkeypatch):
    from pipeline.cli import main

    crops = photo_crops(6, size=(96, 72), seed=11)
    root = tmp_path / "src"
    for i, crop in enumerate(crops):
        _write(root / ("a" if i % 2 else "b") / f"img{i}.jpg", encode(crop, "JPEG", quality=90))
    # a smaller, re-encoded copy of img0, listed after it: different bytes, same picture
    _write(root / "b" / "zz copy.jpg", encode(crops[0].resize((64, 48)), "JPEG", quality=70))

    assert main(["shard", str(root), str(tmp_path / "exact")]) == 0
    assert load_manifest(str(tmp_path / "exact"))["num_samples"] == 7  # exact mode keeps it: the bytes differ
    cores = len(os.sched_getaffinity(0))  # the default --workers: every usable core
    out = capsys.readouterr().out
    assert f"img/s with {cores} worker{'s' if cores > 1 else ''})" in out

    assert main(["shard", str(root), str(tmp_path / "near"), "--dedup-within", "near"]) == 0
    manifest = load_manifest(str(tmp_path / "near"))
    assert manifest["num_samples"] == 6 and manifest["dropped"] == {"duplicate_near": 1}
    (skip,) = manifest["skipped"]
    assert skip["path"] == "b/zz copy.jpg" and "near duplicate of b/img0.jpg" in skip["reason"]


def test_resize_turns_exif_rotated_jpegs_upright(tmp_path):
    import io

    import numpy as np
    from PIL import ImageOps

    from shards.imaging import resize_encode

    stored = Image.new("RGB", (96, 64), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 48, 64))  # left half red, right half blue, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=95, exif=exif)
    data, ext, width, height = resize_encode(buffer.getvalue(), shorter=32, quality=95)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue()))).resize((32, 48))
    out = Image.open(io.BytesIO(data))
    assert (ext, width, height, out.size) == ("jpg", 32, 48, (32, 48))  # portrait: width and height swapped
    assert np.abs(np.asarray(out, dtype=int) - np.asarray(upright, dtype=int)).mean() < 8
    # and an unrotated JPEG keeps its landscape shape
    plain = io.BytesIO()
    stored.save(plain, "JPEG", quality=95)
    assert resize_encode(plain.getvalue(), shorter=32, quality=95)[2:] == (48, 32)


def test_writer_json_and_headers_for_awkward_names_and_files_changed_after_planning(tmp_path):
    """The writer builds each sample's json and tar headers itself: they must read back as
    json.dumps(meta, sort_keys=True, ensure_ascii=False) and as the expected tar members whatever the
    names (quotes, backslashes, control characters, emoji, names over 100 bytes); a file rewritten or
    removed between planning and writing stops its shard, naming the file, with nothing published."""
    from shards import plan_shards, write_shard
    from shards.format import MTIME

    crops = photo_crops(6, size=(48, 40), seed=13)
    files = ['q"uo\\te/ctl\x01 ü.jpg', "🐟 fish/" + "long" * 30 + ".png", "plain/a b.jpg", "plain/tab\there.jpg",
             "plain/line\u2028sep.webp", "plain/x.y.z.jpg"]
    for i, (name, crop) in enumerate(zip(files, crops)):
        _write(tmp_path / "src" / name, encode(crop, {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[name.rsplit(".", 1)[1]]))
    rows = [{"path": f"src/{name}", "labels": ['d"q', "🐟", "e\\f"][: 1 + i % 3], "key": f"k {i}.é" if i % 2 else None}
            for i, name in enumerate(files)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps({k: v for k, v in r.items() if v}) for r in rows) + "\n")
    for source, multi in ((tmp_path / "src", False), (tmp_path / "m.jsonl", True)):
        out = tmp_path / f"out-{multi}"
        manifest = shard_dataset(str(source), str(out), shard_size=4)
        assert manifest["multi_label"] is multi and manifest["num_samples"] == 6
        seen = set()
        for shard in manifest["shards"]:
            with tarfile.open(out / shard["name"]) as tar:
                members = tar.getmembers()
                assert all((m.mode, m.mtime, m.uid, m.gid, m.isfile()) == (0o444, MTIME, 0, 0, True) for m in members)
                by_key = {}
                for m in members:
                    key, ext = m.name.rsplit(".", 1)
                    by_key.setdefault(key, {})[ext] = tar.extractfile(m).read()
            for key, sample in by_key.items():
                meta = json.loads(sample["json"])
                assert sample["json"] == json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
                rel = meta["path"] if not multi else meta["path"][len("src/"):]
                image = next(v for k, v in sample.items() if k not in ("json", "cls"))
                assert image == (tmp_path / "src" / rel).read_bytes()
                assert meta["classes"] == [manifest["classes"][i] for i in meta["labels"]]
                assert ("cls" in sample) is not multi and (multi or int(sample["cls"]) == meta["labels"][0])
                seen.add(rel)
        assert seen == set(files)

    plan = plan_shards(str(tmp_path / "src"), str(tmp_path / "changed"), shard_size=100)
    (tmp_path / "src" / "plain" / "a b.jpg").write_bytes(encode(crops[0], "JPEG", quality=50))
    with pytest.raises(ShardError, match=r"^plain/a b\.jpg: changed since it was scanned"):
        write_shard(plan, 0)
    (tmp_path / "src" / "plain" / "a b.jpg").unlink()
    with pytest.raises(ShardError, match=r"^plain/a b\.jpg: unreadable while writing data-000000\.tar"):
        write_shard(plan, 0)
    # no shard, no staging file, no progress record: only the partitions' scan records (for a re-plan)
    assert os.listdir(tmp_path / "changed") == ["_plan"]
