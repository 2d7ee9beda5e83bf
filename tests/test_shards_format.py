"""shards.format: the one owner of the shard format. Tar headers built for many members at once
equal the stdlib's; TarMembers reads and fails like tarfile; one image-extension list used by the
writer, training, verify and dedup; manifests checked field by field."""
from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile

import numpy as np
import pytest

from shards.format import (IMAGE_EXTS, IMAGE_FORMATS, MTIME, DatasetError, TarMembers, iter_samples, split_name,
                           tar_header, ustar_headers)
from shards.testdata import encode, photo_crops


def _stdlib_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, MTIME, 0o444, 0, 0, "", ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def test_bulk_ustar_headers_equal_the_stdlib_ones():
    rng = random.Random(0)
    chars = "abcXYZ019_-.~!()"
    names = ["".join(rng.choice(chars) for _ in range(rng.randint(1, 100))) for _ in range(300)]
    sizes = [rng.choice([0, 1, 511, 512, 513, 8 ** 11 - 1, rng.randint(0, 10 ** 9)]) for _ in names]
    headers = ustar_headers([n.encode("ascii") for n in names], np.array(sizes))
    for name, size, header in zip(names, sizes, headers):
        assert header.tobytes() == _stdlib_header(name, size) == tar_header(name, size)
    # too long, not ASCII or too big for ustar: PAX, which tarfile reads back as given
    for name, size in (("x" * 101, 3), ("é.json", 5)):
        data = tar_header(name, size) + b"12345"[:size] + bytes(-size % 512 + 1024)
        member = tarfile.open(fileobj=io.BytesIO(data), mode="r:").next()
        assert (member.name, member.size, member.mtime, member.mode) == (name, size, MTIME, 0o444)
    assert b" size=%d\n" % 8 ** 11 in tar_header("big.png", 8 ** 11)


def _tar_bytes(fmt: int) -> bytes:
    """A tar with what shards may hold besides plain members: long and non-ASCII names, a directory, a link."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        members = [("a/s0.jpg", b"x" * 700), ("a/s0.cls", b"3"), ("é/s1.json", b"{}"), ("s2.txt", b"")]
        if fmt != tarfile.USTAR_FORMAT:
            members.append(("d" * 150 + "/s3.png", bytes(range(256)) * 3))
        for i, (name, data) in enumerate(members):
            if i == 2:
                info = tarfile.TarInfo("somedir")
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                info = tarfile.TarInfo("link")
                info.type, info.linkname = tarfile.SYMTYPE, "q" * (20 if fmt == tarfile.USTAR_FORMAT else 200)
                tar.addfile(info)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _read_all(data: bytes, *, seekable: bool, lean: bool, read_every: int = 1) -> tuple[list, str | None]:
    """(name, bytes or None) of the regular members until the end or an error, and the error class name."""
    stream = io.BytesIO(data)
    if not seekable:
        stream.seekable = lambda: False
    got = []
    try:
        if lean:
            members = TarMembers(stream)
            for i, (name, size) in enumerate(members):
                got.append((name, members.read() if i % read_every == 0 else size))
        else:
            with tarfile.open(fileobj=stream, mode="r:" if seekable else "r|") as tar:
                regular = (m for m in tar if m.isfile())
                for i, m in enumerate(regular):
                    got.append((m.name, tar.extractfile(m).read() if i % read_every == 0 else m.size))
    except tarfile.ReadError as err:
        return got, type(err).__name__
    return got, None


def test_lean_tar_reader_reads_and_fails_like_tarfile():
    """TarMembers (the pipeline's tar reader) against the stdlib's tarfile on the same bytes: every
    format, read or skipped members, seekable or streamed, and the tar cut at every 64th byte."""
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        data = _tar_bytes(fmt)
        for seekable in (True, False):
            for read_every in (1, 2):
                kw = dict(seekable=seekable, read_every=read_every)
                full = _read_all(data, lean=True, **kw)
                assert full == _read_all(data, lean=False, **kw) and full[1] is None
                assert len(full[0]) == (4 if fmt == tarfile.USTAR_FORMAT else 5)
                for cut in range(0, len(data), 64):
                    lean = _read_all(data[:cut], lean=True, **kw)
                    assert lean == _read_all(data[:cut], lean=False, **kw), (fmt, seekable, read_every, cut)
    # a damaged header: first one -> an error; a later one ends the archive (both as tarfile does)
    data = bytearray(_tar_bytes(tarfile.PAX_FORMAT))
    for offset in (0, 1536):
        bad = bytearray(data)
        bad[offset + 10] ^= 0xFF
        lean = _read_all(bytes(bad), seekable=True, lean=True)
        assert lean == _read_all(bytes(bad), seekable=True, lean=False)
        assert (lean[1] is not None) == (offset == 0)


def _write_dataset(root, samples: dict[str, dict[str, bytes]], classes=("c0", "c1")) -> str:
    """One shard of `samples` ({key: {ext: bytes}}, members in the given order) + its manifest."""
    root.mkdir(parents=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    (root / "d-000000.tar").write_bytes(data)
    manifest = {"name": "d", "shards": [{"name": "d-000000.tar", "samples": len(samples), "bytes": len(data),
                                         "sha256": hashlib.sha256(data).hexdigest()}],
                "num_samples": len(samples), "classes": list(classes), "label_histogram": [len(samples), 0],
                "multi_label": False}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


def test_one_image_extension_list_for_writer_training_verify_and_dedup(tmp_path):
    """Samples whose image member is .pgm, .jpeg or .tif (other writers' spellings): training reads
    them, verify checks them, dedup hashes them. The five lists this replaces disagreed (verify and
    dedup had no .pgm: "missing image" and no hash for a sample training used)."""
    from shards.dedup import load_exclude
    from shards.imaging import IMAGE_FORMATS as imaging_formats
    from shards.verify import verify_dataset
    from vit.data import EvalStream

    crops = photo_crops(3, size=(40, 30), seed=5)
    images = {"pgm": encode(crops[0].convert("L"), "PPM"), "jpeg": encode(crops[1], "JPEG"),
              "tif": encode(crops[2], "TIFF")}
    assert images["pgm"][:2] == b"P5"  # PIL writes a grey image as PGM
    samples = {f"s{i}": {ext: data, "cls": b"0", "json": json.dumps({"labels": [0], "classes": ["c0"]}).encode()}
               for i, (ext, data) in enumerate(images.items())}
    root = _write_dataset(tmp_path / "ds", samples)
    assert verify_dataset(root) == []
    stream = EvalStream(root, img_size=8, batch_size=3)
    (batch,) = list(stream)
    assert batch.keys == ["s0", "s1", "s2"] and stream.corrupt == []
    assert len(load_exclude(root, threshold=0).near) == 3
    assert imaging_formats is IMAGE_FORMATS and set(IMAGE_FORMATS.values()) <= set(IMAGE_EXTS)
    assert IMAGE_EXTS[:len(IMAGE_FORMATS)] == tuple(IMAGE_FORMATS.values())  # shard tasks store indices into it


def test_iter_samples_groups_members_by_key():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("a/k1.jpg", b"1"), ("a/k1.cls", b"0"), ("a/k1.seg.png", b"2"), ("k2.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    assert list(iter_samples(buf)) == [{"__key__": "a/k1", "jpg": b"1", "cls": b"0", "seg.png": b"2"},
                                       {"__key__": "k2", "json": b"{}"}]
    assert split_name("x.y/k.seg.png") == ("x.y/k", "seg.png") and split_name("noext") == ("noext", "")


MANIFEST_DAMAGE = {  # what is done to a good manifest -> what the one line names
    "no samples": (lambda m: m["shards"][0].pop("samples"), "shards[0] (d-000000.tar) has no 'samples'"),
    "no shards": (lambda m: m.pop("shards"), "field 'shards' is missing"),
    "no classes": (lambda m: m.pop("classes"), "field 'classes' is missing"),
    "shards not a list": (lambda m: m.update(shards={"a": 1}), "field 'shards' is not a list"),
    "samples a string": (lambda m: m["shards"][0].update(samples="3"), "shards[0] (d-000000.tar) 'samples' is '3'"),
    "no sha256": (lambda m: m["shards"][0].pop("sha256"), "shards[0] (d-000000.tar) has no valid 'sha256'"),
    "no name": (lambda m: m["shards"][0].pop("name"), "shards[0] has no 'name'"),
    "histogram short": (lambda m: m.update(label_histogram=[1]), "field 'label_histogram' does not have one count"),
    "num_samples off": (lambda m: m.update(num_samples=7), "field 'num_samples' is 7 but the shards hold 3"),
    "not an object": (lambda m: m.clear() or m.update(x=1) or None, None),
}


@pytest.mark.parametrize("damage", list(MANIFEST_DAMAGE))
def test_a_damaged_manifest_is_one_line_naming_the_file_and_the_field(tmp_path, damage):
    """It used to be a raw `KeyError: 'samples'` traceback (verify, training)."""
    from shards.reader import load_manifest
    from shards.verify import verify_dataset
    from vit.data import EvalStream, TrainStream

    samples = {f"s{i}": {"png": encode(crop, "PNG"), "cls": b"0", "json": b'{"labels": [0]}'}
               for i, crop in enumerate(photo_crops(3, size=(16, 12), seed=1))}
    root = _write_dataset(tmp_path / "ds", samples)
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    change, field = MANIFEST_DAMAGE[damage]
    change(manifest)
    if damage == "not an object":
        manifest, field = [manifest], "the file is not a JSON object"
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(manifest))
    where = f"{root}/manifest.json"
    expected = f"{where}: {field}"
    for read in (lambda: load_manifest(root), lambda: EvalStream(root, img_size=8, batch_size=2),
                 lambda: TrainStream(root, img_size=8, global_batch_size=1, lanes=1, rank=0, world_size=1)):
        with pytest.raises(DatasetError) as err:
            read()
        assert str(err.value).startswith(expected) and "re-shard the dataset" in str(err.value), str(err.value)
        assert "\n" not in str(err.value) and err.value.exit_code == 2
    (problem,) = verify_dataset(root)
    assert problem.startswith(expected)


def test_cli_verify_of_a_manifest_without_samples_is_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    samples = {"s0": {"png": encode(photo_crops(1, size=(16, 12), seed=1)[0], "PNG"), "cls": b"0", "json": b"{}"}}
    root = _write_dataset(tmp_path / "ds", samples)
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    del manifest["shards"][0]["samples"]
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(manifest))
    proc = subprocess.run([str(Path(sys.executable).parent / "vitpipe"), "verify", root], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[0] == (f"PROBLEM {root}/manifest.json: shards[0] (d-000000.tar) has no 'samples'; "
                                           "re-shard the dataset with `vitpipe shard` (or re-index it with "
                                           "`vitpipe index`)")
