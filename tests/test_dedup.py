"""Near-duplicate matching on low-texture pictures: dHash proposes, the 8x8 colour comparison confirms.

The pictures are distinct low-texture cells of the images that ship with scikit-image and
scikit-learn (skies, silhouettes, documents, plain colours; `shards.testdata.LOW_TEXTURE`).
"""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from shards import shard_dataset
from shards.dedup import same_picture
from shards.imaging import probe, thumbnail
from shards.testdata import encode, low_texture_images

THRESHOLD = 6  # shard_dataset's default near_dup_threshold


@pytest.fixture(scope="module")
def pictures() -> dict[str, bytes]:
    return {name: encode(image, "PNG") for name, image in low_texture_images().items()}


def copies(png: bytes) -> dict[str, bytes]:
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    half = image.resize((image.width // 2, image.height // 2), Image.BILINEAR)
    return {"jpeg q90": encode(image, "JPEG", quality=90), "jpeg q50": encode(image, "JPEG", quality=50),
            "half jpeg": encode(half, "JPEG", quality=75), "half png": encode(half, "PNG")}


def _distance(a: bytes, b: bytes) -> int:
    return (probe(a).dhash ^ probe(b).dhash).bit_count()


def test_distinct_low_texture_pictures_collide_in_dhash_but_are_not_confirmed(pictures):
    hashes = {name: probe(data).dhash for name, data in pictures.items()}
    pairs = [(a, b) for a, b in itertools.combinations(pictures, 2) if (hashes[a] ^ hashes[b]).bit_count() <= THRESHOLD]
    assert len(pairs) >= 20  # dHash alone: 25 pairs of distinct pictures within 6 bits
    thumbs = {name: thumbnail(data) for name, data in pictures.items()}
    assert [(a, b) for a, b in pairs if same_picture(thumbs[a], thumbs[b])] == []


def test_every_copy_is_confirmed_as_the_same_picture(pictures):
    for name, png in pictures.items():
        for kind, data in copies(png).items():
            assert same_picture(thumbnail(data), thumbnail(png)), (name, kind)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_sharding_keeps_distinct_low_texture_pictures_and_drops_their_copies(pictures, tmp_path):
    """Both paths of shard_dataset: --dedup-within near, and --exclude against an evaluation set."""
    names = sorted(pictures)
    src, originals, evalset = tmp_path / "src", tmp_path / "originals", tmp_path / "eval"
    found = {}  # copy -> its original, where dHash finds it at all (a flat picture's re-encode can move > 6 bits)
    excluded = set()  # originals with a copy in the evaluation set that dHash finds
    for i, name in enumerate(names):
        stem = name.replace("/", "_")
        _write(src / "a" / f"{stem}.png", pictures[name])
        _write(originals / "a" / f"{stem}.png", pictures[name])
        kind, data = list(copies(pictures[name]).items())[i % 4]
        copy = f"a/zz {kind} of {stem}.{'png' if kind.endswith('png') else 'jpg'}"
        _write(src / copy, data)
        if _distance(data, pictures[name]) <= THRESHOLD:
            found[copy] = f"a/{stem}.png"
        if i % 2:  # the evaluation set: a re-encoded copy of every other picture
            data = copies(pictures[name])["jpeg q90"]
            _write(evalset / "x" / f"{stem}.jpg", data)
            if _distance(data, pictures[name]) <= THRESHOLD:
                excluded.add(f"a/{stem}.png")
    assert len(found) >= 30 and len(excluded) >= 16  # of 37 and 18 (measured: 32, 17)

    manifest = shard_dataset(str(src), str(tmp_path / "near"), dedup_within="near")
    dropped = {s["path"]: s for s in manifest["skipped"]}
    assert set(dropped) == set(found)  # every copy dHash finds, and not one distinct picture
    assert all(s["kind"] == "duplicate_near" and found[p] in s["reason"] for p, s in dropped.items())
    assert manifest["num_samples"] == 2 * len(names) - len(found)

    manifest = shard_dataset(str(originals), str(tmp_path / "excl"), exclude=[str(evalset)])
    kinds = {s["path"]: s["kind"] for s in manifest["skipped"]}
    assert set(kinds) == excluded  # not one picture of the other half is taken for an evaluation image
    assert set(kinds.values()) == {"excluded_near"}
