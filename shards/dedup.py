"""De-duplication: exact (sha256 of the bytes) and near (dHash Hamming distance) matches.

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

from shards import storage
from shards.format import IMAGE_EXTS, TarMembers, split_name
from shards.imaging import BadImage, probe


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

    def __len__(self) -> int:
        return len(self._values)

    def add(self, value: int, tag: str) -> None:
        slot = len(self._values)
        self._values.append(value)
        self._tags.append(tag)
        for table, (shift, mask) in zip(self._tables, self._bands):
            table.setdefault((value >> shift) & mask, []).append(slot)

    def find(self, value: int) -> tuple[str, int] | None:
        """(tag, distance) of the closest stored hash within the threshold, else None."""
        best = None
        for table, (shift, mask) in zip(self._tables, self._bands):
            for slot in table.get((value >> shift) & mask, ()):
                dist = (self._values[slot] ^ value).bit_count()
                if dist <= self.threshold and (best is None or dist < best[1]):
                    best = (self._tags[slot], dist)
        return best


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
            self.near.add(probe(data).dhash, tag)
        except BadImage:
            return False
        return True

    def match(self, digest: str, value: int) -> str | None:
        """The drop reason if (content hash, dHash) matches the evaluation set."""
        if digest in self.sha256:
            return f"exact duplicate of evaluation image {self.sha256[digest]}"
        hit = self.near.find(value)
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
