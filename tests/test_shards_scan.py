"""The pass-through scan reads only the ends of a record (header, end marker, content key) where they
settle it. These tests hold it to the answer a scan of the whole bytes gives, and check what the
content key must never cost: a missed exact duplicate, a false one, or a stale shard on re-run."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

import shards.plan as plan
from shards import shard_dataset
from shards.sources import list_source
from shards.imaging import BadImage, header_probe
from shards.testdata import encode, photo_crops


def _big_jpeg(seed: int) -> bytes:
    data = encode(photo_crops(1, size=(480, 360), seed=seed)[0], "JPEG", quality=95)
    assert len(data) > plan._HEAD_READ + plan._KEY_ENDS  # read at the ends only
    return data


def _odd_records() -> dict[str, bytes]:
    """Large records of every shape the ends can mislead on."""
    jpeg = _big_jpeg(1)
    image = Image.open(io.BytesIO(jpeg))
    exif = Image.Exif()
    exif[0x010E] = "x" * 30000  # an APP1 segment pushing the frame header past the first read
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    middle = bytearray(jpeg)
    middle[len(jpeg) // 2] ^= 0xFF  # same size and ends, damaged middle (header mode accepts it, as before)
    png = encode(image.resize((300, 300)), "PNG")
    bomb = bytearray(jpeg)
    frame = bomb.index(b"\xff\xc0")  # baseline frame header: declare 60000 x 60000 pixels
    bomb[frame + 5:frame + 9] = (60000).to_bytes(2, "big") * 2
    return {
        "plain.jpg": jpeg,
        "exif_app1.jpg": buffer.getvalue(),
        "truncated.jpg": jpeg[: len(jpeg) * 2 // 3],
        "trailing_zeros.jpg": jpeg + bytes(plan._KEY_ENDS + 900),  # the end marker lies before the tail read
        "trailing_crlf.jpg": jpeg + b"\r\n",
        "damaged_middle.jpg": bytes(middle),
        "plain.png": png,
        "cut.png": png[:-5],
        "image.webp": encode(image, "WEBP", quality=90),
        "lossless.webp": encode(image.resize((240, 180)), "WEBP", lossless=True),
        "cut.webp": encode(image, "WEBP", quality=90)[:-100],
        "text.jpg": b"not an image " * 3000,
        "small.jpg": encode(image.resize((40, 30)), "JPEG"),
        "bomb.jpg": bytes(bomb),
    }


def _whole_file_answer(data: bytes) -> tuple:
    try:
        p = header_probe(data)
    except BadImage as err:
        return plan._bad_image(err)
    return ("ok", plan.content_key(data), None, p.ext, p.width, p.height, len(data))


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("odd")
    records = _odd_records()
    for name, data in records.items():
        (root / name).write_bytes(data)
    with tarfile.open(root / "all.tar", "w") as tar:  # the same records as members of a tar (i21k-tars)
        for name in records:
            tar.add(root / name, arcname=name)
    return root, records


def test_ends_scan_answers_as_a_whole_file_scan(odd_files, monkeypatch):
    root, records = odd_files
    whole_reads = []
    read = plan.storage.read_record
    monkeypatch.setattr(plan.storage, "read_record", lambda *a, **k: whole_reads.append(a[0]) or read(*a, **k))
    with tarfile.open(root / "all.tar") as tar:
        members = {m.name: (str(root / "all.tar"), m.offset_data, m.size) for m in tar}
    for name, data in records.items():
        expected = _whole_file_answer(data)
        assert plan.scan_records([(str(root / name), -1, -1)], plan.DEFAULT_MAX_PIXELS, decode=False) == [expected], name
        assert plan.scan_records([members[name]], plan.DEFAULT_MAX_PIXELS, decode=False) == [expected], f"tar: {name}"
    settled_by_ends = {n for n in records if str(root / n) not in whole_reads}
    # the usual case reads just the ends; the frame header past 16 KB, the end marker before the
    # tail, other formats and anything broken fall back to reading the whole record
    assert {"plain.jpg", "trailing_crlf.jpg", "damaged_middle.jpg", "plain.png", "bomb.jpg", "image.webp",
            "lossless.webp"} <= settled_by_ends
    assert not {"exif_app1.jpg", "trailing_zeros.jpg", "truncated.jpg", "cut.png", "cut.webp"} & settled_by_ends
    assert plan.scan_records([(str(root / "small.jpg"), -1, -1)], plan.DEFAULT_MAX_PIXELS, decode=False)[0][0] == "ok"


def test_webp_headers_give_the_size_a_decode_gives():
    """Pass-through takes a WebP's size from its first chunk (lossy, lossless, or the extended
    format of images with alpha, EXIF or animation) and its completeness from the RIFF size."""
    from shards.imaging import probe

    image = photo_crops(1, size=(301, 173), seed=14)[0]
    frames = [image, image.transpose(Image.FLIP_LEFT_RIGHT)]
    variants = {
        "lossy": encode(image, "WEBP", quality=80),
        "lossless": encode(image, "WEBP", lossless=True),
        "alpha": encode(image.convert("RGBA"), "WEBP", quality=80),
        "exif": encode(image, "WEBP", exif=Image.Exif().tobytes()),
        "animated": encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100),
    }
    for name, data in variants.items():
        full = probe(data)
        assert (header_probe(data).ext, header_probe(data).width, header_probe(data).height) == \
            (full.ext, full.width, full.height) == ("webp", 301, 173), name
    with pytest.raises(BadImage):  # cut: the RIFF size no longer matches, so it is decoded, and fails
        header_probe(variants["lossy"][:-50])


def test_the_pass_through_scan_settles_the_usual_images_and_names_each_bad_one(odd_files, tmp_path):
    """plan._scan_part in pass-through mode: every kind of bad record gets its skip kind, the usual
    JPEGs, PNGs and WebPs (a frame header behind a 30 KB EXIF segment included; local files, tar
    members and file:// URLs) are kept, with mtimes exactly as os.stat gives them."""
    root, records = odd_files
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "empty.jpg").write_bytes(b"")
    (extra / "marker_only.jpg").write_bytes(b"\xff\xd8\xff\xd9")
    (extra / "tiny.png").write_bytes(encode(photo_crops(1, size=(8, 6), seed=4)[0], "PNG"))
    (extra / "a_folder.jpg").mkdir()
    os.symlink(extra / "nowhere.jpg", extra / "broken.jpg")
    files = sorted([root / name for name in records] + [p for p in extra.iterdir()])
    for i, path in enumerate(p for p in files if p.is_file() and not p.is_symlink()):
        os.utime(path, ns=(1_700_000_000_000_000_000, 1_700_000_000_123_456_789 + i * 1_000_000_007))
    with tarfile.open(root / "all.tar") as tar:
        members = {f"tar:{m.name}": (str(root / "all.tar"), m.offset_data, m.size) for m in tar}
    locations = [(str(p), -1, -1) for p in files] + list(members.values()) + [("file://" + str(root / "plain.jpg"), -1, -1)]
    names = [p.name for p in files] + list(members) + ["file://plain.jpg"]

    part = plan._scan_part(locations, plan.DEFAULT_MAX_PIXELS, False, True)
    assert {kind for kind, _ in part.bad.values()} == {"decompression_bomb", "not_an_image", "empty_file",
                                                       "unreadable", "corrupt_image"}
    usual = ["damaged_middle.jpg", "exif_app1.jpg", "plain.jpg", "plain.png", "small.jpg", "trailing_crlf.jpg",
             "image.webp", "lossless.webp"]
    # also kept, after a decode: a PNG cut inside its end chunk (the pixels are whole), a JPEG whose end marker
    # lies before the tail that was read
    usual += ["cut.png", "trailing_zeros.jpg"]
    assert {n for n, ok in zip(names, part.ok) if ok} == {*usual, *(f"tar:{n}" for n in usual), "file://plain.jpg",
                                                         "tiny.png"}
    for (url, offset, _), ok, mtime in zip(locations, part.ok, part.mtime):
        if ok:
            assert mtime == (os.stat(url.removeprefix("file://")).st_mtime if offset < 0 else -1.0)


def test_ordered_map_keeps_few_chunks_in_memory():
    """The scan's chunks go to the workers through ordered_map: results in order, and at most
    `ahead` chunks drawn and not yet handed back (Executor.map would draw all of them at once)."""
    from concurrent.futures import ThreadPoolExecutor

    from shards.workers import ordered_map

    drawn, out = [], []

    def chunks():
        for i in range(100):
            drawn.append(i)
            yield i

    with ThreadPoolExecutor(2) as executor:
        for value in ordered_map(executor, lambda x: x * x, chunks(), ahead=4):
            assert len(drawn) - len(out) <= 4
            out.append(value)
    assert out == [i * i for i in range(100)]


def test_exact_duplicates_are_confirmed_on_the_whole_content(tmp_path):
    jpeg = _big_jpeg(2)
    twin = bytearray(jpeg)
    twin[len(jpeg) // 2] ^= 0x01  # same size, same first and last 4 KB: the same content key
    assert plan.content_key(bytes(twin)) == plan.content_key(jpeg)
    for cls, name, data in (("a", "original.jpg", jpeg), ("b", "copy.jpg", jpeg), ("b", "twin.jpg", bytes(twin)),
                            ("c", "other.jpg", _big_jpeg(3))):
        (tmp_path / "src" / cls).mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / cls / name).write_bytes(data)
    for workers in (1, 2):
        manifest = shard_dataset(str(tmp_path / "src"), str(tmp_path / f"out{workers}"), workers=workers)
        assert manifest["num_samples"] == 3
        assert [(s["path"], s["reason"]) for s in manifest["skipped"]] == [("b/copy.jpg", "exact duplicate of a/original.jpg")]


def test_a_source_file_changed_between_runs_gets_its_shard_rewritten(tmp_path):
    """A shard task's digest covers the source listing (sizes, mtimes), not only the content keys,
    which for big files hash just the ends: a file rewritten in the middle must not leave the old
    bytes in a kept shard."""
    src = tmp_path / "src"
    for i in range(6):
        (src / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (src / f"c{i % 2}" / f"{i}.jpg").write_bytes(_big_jpeg(10 + i))
    out = tmp_path / "out"
    before = shard_dataset(str(src), str(out), shard_size=2)
    changed = src / "c0" / "2.jpg"
    data = bytearray(changed.read_bytes())
    data[len(data) // 2] ^= 0x01
    changed.write_bytes(bytes(data))
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    (out / "manifest.json").unlink()  # as after a crash: the re-run finds progress records and shards
    after = shard_dataset(str(src), str(out), shard_size=2)
    fresh = shard_dataset(str(src), str(tmp_path / "fresh"), shard_size=2)
    assert after["shards"] == fresh["shards"] != before["shards"]
    assert bytes(data) in b"".join((out / s["name"]).read_bytes() for s in after["shards"])


def test_a_multi_label_row_with_a_label_outside_the_class_index_is_skipped(tmp_path):
    """Rows are checked one by one only when flagged; a multi-label row flagged by any of its labels."""
    crops = photo_crops(5, size=(64, 48), seed=6)
    rows = []
    for i, crop in enumerate(crops):
        (tmp_path / f"{i}.jpg").write_bytes(encode(crop, "JPEG"))
        rows.append({"path": f"{i}.jpg", "labels": [["a", "b"], ["b"], ["b", "zebra"], ["a"], ["zebra"]][i]})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "classes.txt").write_text("a\nb\n")
    manifest = shard_dataset(str(tmp_path / "m.jsonl"), str(tmp_path / "out"), classes=str(tmp_path / "classes.txt"))
    assert [(s["path"], s["reason"]) for s in manifest["skipped"]] == [
        ("2.jpg", "class 'zebra' is not in the class index (--classes)"),
        ("4.jpg", "class 'zebra' is not in the class index (--classes)")]
    assert manifest["num_samples"] == 3 and manifest["label_histogram"] == [2, 2]


def test_imagefolder_fingerprint_is_the_documented_hash_of_the_listing(tmp_path):
    """The fingerprint stored in manifests (and compared by flows to skip finished work) is
    sha256(kind, then per file in walk order: JSON [relative path, size, mtime] + newline). Pinned
    here so a faster listing cannot change it for existing datasets."""
    import hashlib

    from shards import source_fingerprint

    names = {"b c": ["z.jpg", 'q"uote.jpg', "tab\there.jpg"], "a": ["ü 1.jpg", "sub/n.jpg"], "é": ["x.png"]}
    crop = encode(photo_crops(1, size=(32, 24), seed=7)[0], "JPEG")
    for i, (cls, files) in enumerate(names.items()):
        for j, name in enumerate(files):
            path = tmp_path / "src" / cls / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(crop + bytes(i * 10 + j))
            os.utime(path, (1_700_000_000.25 + j, 1_700_000_000.125 + 3.3 * i + j))
    expected = hashlib.sha256(b"imagefolder")
    for dirpath, dirnames, filenames in os.walk(tmp_path / "src"):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(tmp_path / "src").as_posix()
            st = path.stat()
            expected.update(json.dumps([rel, st.st_size, st.st_mtime], ensure_ascii=False).encode() + b"\n")
    assert source_fingerprint(str(tmp_path / "src")) == expected.hexdigest()


def test_a_file_name_that_is_not_utf8_is_a_one_line_error_naming_it(tmp_path):
    from shards import ShardError

    (tmp_path / "src" / "cls").mkdir(parents=True)
    data = encode(photo_crops(1, size=(32, 24), seed=8)[0], "JPEG")
    (tmp_path / "src" / "cls" / "ok.jpg").write_bytes(data)
    with open(os.path.join(os.fsencode(tmp_path / "src" / "cls"), b"bad\xff.jpg"), "wb") as f:
        f.write(data)
    with pytest.raises(ShardError, match=r"not valid UTF-8 \(b'cls/bad\\xff\.jpg'\); rename it"):
        shard_dataset(str(tmp_path / "src"), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_the_fingerprint_from_scan_stats_equals_the_listed_one_and_a_broken_link_is_a_counted_skip(tmp_path):
    """plan_shards lists a local tree in partitions (class folders, each adding its share of the
    listing's hash): the manifest's fingerprint must still be source_fingerprint's and one whole
    listing's (flows compare them to skip finished work), for any partition count, with files that
    are not records (at the root, in a dot folder, in a subfolder) and a broken link, which is
    skipped as unreadable instead of stopping the listing."""
    from shards import source_fingerprint

    crops = photo_crops(4, size=(32, 24), seed=9)
    for i, rel in enumerate(["a/1.jpg", "a/sub/2.jpg", "b c/3.jpg", "b c/ü.jpg"]):
        _write(tmp_path / "src" / rel, encode(crops[i], "JPEG"))
        os.utime(tmp_path / "src" / rel, (1_700_000_000.5, 1_700_000_000.25 + i))
    _write(tmp_path / "src" / "stray.jpg", encode(crops[0], "JPEG"))
    _write(tmp_path / "src" / ".cache" / "x.bin", b"x" * 7)
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "src" / "b c" / "broken.jpg")
    manifest = shard_dataset(str(tmp_path / "src"), str(tmp_path / "out"), shard_size=10)
    assert manifest["source"]["fingerprint"] == source_fingerprint(str(tmp_path / "src"))
    assert manifest["source"]["fingerprint"] == list_source(str(tmp_path / "src")).fingerprint
    for partitions in (2, 3):
        again = shard_dataset(str(tmp_path / "src"), str(tmp_path / f"out{partitions}"), shard_size=10,
                              partitions=partitions)
        assert again["source"]["fingerprint"] == manifest["source"]["fingerprint"]
    assert manifest["num_samples"] == 4
    assert [(s["path"], s["kind"]) for s in manifest["skipped"] if s["kind"] == "unreadable"] == [("b c/broken.jpg", "unreadable")]
    # and it follows the files: a touched file changes it
    os.utime(tmp_path / "src" / "a" / "1.jpg", (1_700_000_000.5, 1_700_000_009.0))
    assert source_fingerprint(str(tmp_path / "src")) != manifest["source"]["fingerprint"]


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_a_jsonl_manifest_cut_into_line_blocks_gives_the_whole_listing_and_the_same_shards(tmp_path, monkeypatch):
    """A jsonl manifest is cut at newlines into blocks the workers parse: with blocks of ~100 bytes
    (one or two lines each; a BOM, CRLF line ends and a blank line included) the records, the
    fingerprint and the shards are the whole listing's for any partition count, and a bad line is
    still named by its line number in the file."""
    import shards.partitions as partitions
    from shards import ShardError

    crops = photo_crops(12, size=(32, 24), seed=3)
    for i, crop in enumerate(crops):
        _write(tmp_path / "imgs" / f"{i}.jpg", encode(crop, "JPEG"))
    lines = [json.dumps({"path": f"imgs/{i}.jpg", "labels": ["a", "b"] if i % 3 else ["c"]}) for i in range(12)]
    lines.insert(5, "")
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    whole = list_source(str(manifest))
    reference = shard_dataset(str(manifest), str(tmp_path / "one"), shard_size=5, partitions=1)
    monkeypatch.setattr(partitions, "_MANIFEST_BLOCK", 100)
    split = partitions.split_source(str(manifest), partitions=3)
    assert len(split.partitions) == 3 and sum(len(p.units) for p in split.partitions) >= 5
    for count in (2, 5):
        out = tmp_path / f"blocks{count}"
        got = shard_dataset(str(manifest), str(out), shard_size=5, partitions=count)
        assert got["source"]["fingerprint"] == whole.fingerprint == reference["source"]["fingerprint"]
        assert got["shards"] == reference["shards"]
    lines[9] = '{"path": "imgs/9.jpg", "labels": '
    manifest.write_bytes("\n".join(lines).encode() + b"\n")
    with pytest.raises(ShardError, match=rf"^{manifest}:10: not valid JSON"):
        shard_dataset(str(manifest), str(tmp_path / "bad"), shard_size=5, partitions=4)


def test_scan_records_one_per_partition_serve_a_rerun_with_other_partitions_unless_a_file_changed(tmp_path, capsys):
    """A planner stopped before writing (a killed coordinator) leaves one scan record per partition in
    <out>/_plan, plain arrays (no pickle). A re-run with other partitions takes each class folder's
    scan from them instead of reading its images (local folders are listed by names alone: the
    record is checked against a stat of its files then), except the folder holding a file rewritten
    since and the folder whose record was cut short; the shards are those of a fresh run, and the
    records are gone once the dataset is."""
    import numpy as np

    from shards import plan_shards

    crops = photo_crops(10, size=(48, 32), seed=11)
    for i, crop in enumerate(crops):
        _write(tmp_path / "src" / f"c{i % 5}" / f"{i}.jpg", encode(crop, "JPEG"))
    out = tmp_path / "out"
    plan_shards(str(tmp_path / "src"), str(out), shard_size=4, partitions=3)
    records = sorted(p for p in (out / "_plan").glob("*.npz") if not p.name.startswith(("s-", "r-")))  # the scan
    # records (the plan's phase files, s-* and r-*, beside them)
    assert len(records) == 3  # units "" (no images), c0 | c1, c2 | c3, c4: a record per partition, not per unit
    for record in records:
        with np.load(record, allow_pickle=False) as data:  # data only
            assert len(data["unit_keys"]) in (1, 2) and int(data["rows"].sum()) == len(data["ok"])
    changed = tmp_path / "src" / "c3" / "3.jpg"
    changed.write_bytes(encode(crops[0].transpose(Image.Transpose.FLIP_LEFT_RIGHT), "JPEG"))
    records[0].write_bytes(records[0].read_bytes()[:100])  # c0's record cut short: scanned again
    capsys.readouterr()
    manifest = shard_dataset(str(tmp_path / "src"), str(out), shard_size=4, partitions=2, progress=True)
    assert "plan: 3 unit(s)" in capsys.readouterr().out  # c1, c2, c4 (c3 changed), in other partitions
    assert not (out / "_plan").exists()
    fresh = shard_dataset(str(tmp_path / "src"), str(tmp_path / "fresh"), shard_size=4, workers=2, partitions=4)
    assert manifest["shards"] == fresh["shards"]
    assert manifest["source"]["fingerprint"] == fresh["source"]["fingerprint"]


def test_keys_that_collide_across_partitions_are_made_unique_as_in_one_listing(tmp_path):
    """Keys come from paths: a/b_c.jpg and a_b/c.jpg are both a_b_c. Listed in different partitions
    (in worker processes, their tables pickled back), the collision is still found and the shards
    are those of one listing."""
    crops = photo_crops(4, size=(32, 24), seed=12)
    for path, crop in zip(("a/b_c.jpg", "a/x.jpg", "a_b/c.jpg", "z/y.jpg"), crops):
        _write(tmp_path / "src" / path, encode(crop, "JPEG"))
    one = shard_dataset(str(tmp_path / "src"), str(tmp_path / "one"), shard_size=10, partitions=1)
    many = shard_dataset(str(tmp_path / "src"), str(tmp_path / "many"), shard_size=10, workers=2, partitions=4)
    assert many["shards"] == one["shards"]
    with tarfile.open(tmp_path / "many" / many["shards"][0]["name"]) as tar:
        keys = {name.rsplit(".", 1)[0] for name in tar.getnames()}
    assert len(keys) == 4 and "a_b_c" in keys
