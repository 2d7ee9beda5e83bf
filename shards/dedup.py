"""De-duplication: exact (sha256 of the bytes) and near (dHash Hamming distance) matches.

A dHash match is only a candidate: `same_picture` confirms it by comparing both images at 8x8
RGB (mean absolute difference of the box-averaged colours). Flat, low-detail images (skies,
silhouettes, documents, plain colours) have dHash bits set by noise, so unrelated ones fall
within the Hamming threshold; their colours at 8x8 still tell them apart, while re-encoded,
resized and PNG copies stay within a few levels. Confirmation decodes the two images again, once
per candidate pair, so it costs nothing on records without a dHash hit.

`HashIndex` finds 64-bit hashes within a Hamming threshold t without comparing all pairs: the
hash is cut into t+1 bands; two hashes within distance t agree on at least one band (pigeonhole),
so only candidates sharing a band are checked.
`load_exclude` hashes an evaluation set given as a dataset (manifest + shards), any source this
package reads (class folders, tars, jsonl/csv), or a plain list of image paths/URLs (.txt).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from shards import storage
from shards.format import IMAGE_EXTS, TarMembers, split_name
from shards.imaging import BadImage, probe, thumbnail

# A dHash candidate is the same picture when the thumbnails' mean absolute difference (0..255 levels)
# is at most max(SAME_PICTURE_MIN_DIFF, SAME_PICTURE_REL_DIFF x contrast), contrast being the larger
# mean absolute deviation of the two thumbnails from their mean colour: copies of detailed pictures move
# more at 8x8 (edges cross cell borders), flat pictures get the floor. Measured on crops of the
# scikit-image / scikit-learn images (tests/test_dedup.py): JPEG q50, 1/2 and 1/3 size and PNG copies
# stay within it; distinct low-texture crops with dHash distance <= 6 differ by 7 levels or more.
SAME_PICTURE_MIN_DIFF = 4.0
SAME_PICTURE_REL_DIFF = 0.1


def same_picture(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two `thumbnail`s show the same picture (the confirmation of a dHash match)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    contrast = max(float(np.abs(t - t.mean(axis=(0, 1))).mean()) for t in (a, b))
    return float(np.abs(a - b).mean()) <= max(SAME_PICTURE_MIN_DIFF, SAME_PICTURE_REL_DIFF * contrast)


def confirm_with(data: Callable[[], bytes], stored: Callable[[Any], np.ndarray] = lambda thumb: thumb
                 ) -> Callable[[Any], bool]:
    """A `HashIndex.find` confirm for the record whose bytes `data()` gives: true when a candidate's
    thumbnail (`stored(payload)`) is `same_picture`. The record is decoded at the first candidate only."""
    thumb: list[np.ndarray] = []

    def confirm(payload: Any) -> bool:
        if not thumb:
            thumb.append(thumbnail(data()))
        return same_picture(thumb[0], stored(payload))

    return confirm


class HashIndex:
    def __init__(self, threshold: int):
        if not 0 <= threshold < 32:
            raise ValueError(f"near-duplicate threshold {threshold}: use 0..31 bits")
        self.threshold = threshold
        bands = threshold + 1
        edges = [round(i * 64 / bands) for i in range(bands + 1)]
        self._bands = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges[:-1], edges[1:])]
        self._tables: list[dict[int, list[int]]] = [dict() for _ in self._bands]
        self._values: list[int] = []
        self._tags: list[str] = []
        self._payloads: list = []

    def __len__(self) -> int:
        return len(self._values)

    def add(self, value: int, tag: str, payload=None) -> None:
        """Store a hash; `payload` (anything) is handed to `find`'s `confirm` for this entry."""
        slot = len(self._values)
        self._values.append(value)
        self._tags.append(tag)
        self._payloads.append(payload)
        for table, (shift, mask) in zip(self._tables, self._bands):
            table.setdefault((value >> shift) & mask, []).append(slot)

    def find(self, value: int, confirm: Callable[[Any], bool] | None = None) -> tuple[str, int] | None:
        """(tag, distance) of the closest stored hash within the threshold whose payload
        `confirm` accepts (every one when `confirm` is None), else None."""
        hits = {}
        for table, (shift, mask) in zip(self._tables, self._bands):
            for slot in table.get((value >> shift) & mask, ()):
                dist = (self._values[slot] ^ value).bit_count()
                if dist <= self.threshold:
                    hits[slot] = dist
        for slot, dist in sorted(hits.items(), key=lambda kv: (kv[1], kv[0])):
            if confirm is None or confirm(self._payloads[slot]):
                return self._tags[slot], dist
        return None


@dataclass
class ExcludeSet:
    threshold: int
    sha256: dict[str, str] = field(default_factory=dict)  # content hash -> where it came from
    near: HashIndex | None = None
    sources: list[str] = field(default_factory=list)
    fingerprint: str = ""

    def __post_init__(self):
        if self.near is None:
            self.near = HashIndex(self.threshold)

    def add(self, data: bytes, tag: str) -> bool:
        digest = hashlib.sha256(data).hexdigest()
        self.sha256.setdefault(digest, tag)
        try:
            self.near.add(probe(data).dhash, tag, payload=thumbnail(data))
        except BadImage:
            return False
        return True

    def match(self, digest: str, value: int, data: Callable[[], bytes]) -> str | None:
        """The drop reason if (content hash, dHash) matches the evaluation set; `data()` gives the
        record's bytes, read only to confirm a dHash candidate (`same_picture`)."""
        if digest in self.sha256:
            return f"exact duplicate of evaluation image {self.sha256[digest]}"
        hit = self.near.find(value, confirm_with(data))
        if hit is not None:
            return f"near duplicate of evaluation image {hit[0]} (dHash distance {hit[1]})"
        return None


def _iter_dataset_images(url: str):
    from shards.reader import shard_urls

    for shard in shard_urls(url):
        with storage.open_read(shard) as f:
            members = TarMembers(f)
            for name, _ in members:
                if split_name(name)[1] in IMAGE_EXTS:
                    yield name, members.read()


def _iter_list_images(url: str):
    base = storage.parent(url)
    for line in storage.read_bytes(url).decode("utf-8-sig").splitlines():
        path = line.strip()
        if not path or path.startswith("#"):
            continue
        yield path, storage.read_bytes(storage.resolve(base, path))


def _iter_source_images(url: str):
    from shards.sources import list_source

    for rec in list_source(url).records:
        yield rec.path, rec.read()


def load_exclude(specs, *, threshold: int) -> ExcludeSet:
    """Hash every image of the evaluation set(s) `specs` (URL or list of URLs)."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    out = ExcludeSet(threshold=threshold)
    digest = hashlib.sha256()
    for spec in specs:
        spec = str(spec)
        is_file_spec = spec.lower().endswith((".txt", ".jsonl", ".json", ".csv", ".tar"))
        if not is_file_spec and storage.exists(storage.join(spec, "manifest.json")):
            images = _iter_dataset_images(spec)
        elif spec.lower().endswith(".txt"):
            images = _iter_list_images(spec)
        else:
            if not storage.exists(spec):
                raise storage.StorageNotFound(f"{spec}: --exclude set not found; give a dataset URL, a source or a .txt list")
            images = _iter_source_images(spec)
        out.sources.append(spec)
        for tag, data in images:
            out.add(data, tag)
            digest.update(hashlib.sha256(data).digest())
    out.fingerprint = digest.hexdigest()
    return out
