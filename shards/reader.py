"""Reading a dataset back: manifest, shard URLs, streams for webdataset, and a DDP preflight.

Importing this module registers an `s3` handler in webdataset's `gopen_schemes`, so stock
`webdataset.WebDataset(shard_urls(url))` streams s3:// shards through `shards.storage` (same
endpoint and credentials as everything else; no CLI tool needed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

from shards import storage
from shards.format import MANIFEST, DatasetError, validate_manifest


def manifest_url(dataset_url: str) -> str:
    dataset_url = str(dataset_url)
    return dataset_url if dataset_url.endswith(MANIFEST) else storage.join(dataset_url, MANIFEST)


def dataset_root(dataset_url: str) -> str:
    dataset_url = str(dataset_url)
    return storage.parent(dataset_url) if dataset_url.endswith(MANIFEST) else dataset_url


def load_manifest(dataset_url: str) -> dict:
    """The dataset's manifest, its fields checked (shards.format.validate_manifest); a dataset
    without a manifest does not exist."""
    url = manifest_url(dataset_url)
    if not storage.exists(url):
        raise DatasetError(f"{url}: no manifest.json; a dataset without a manifest does not exist "
                           "(shard it with `vitpipe shard`, or finish an interrupted run by re-running it)")
    return validate_manifest(storage.read_json(url), url)


def shard_urls(dataset_url: str, manifest: dict | None = None) -> list[str]:
    """Full URLs of the shards, in manifest order."""
    manifest = manifest if manifest is not None else load_manifest(dataset_url)
    root = dataset_root(dataset_url)
    return [storage.join(root, shard["name"]) for shard in manifest["shards"]]


def open_shard(url: str) -> BinaryIO:
    """A stream of one shard (S3 objects are streamed, not downloaded)."""
    return storage.open_read(url)


def _gopen_s3(url, mode="rb", bufsize=8192, **kw):
    if mode != "rb":
        raise ValueError(f"{url}: s3 shards are opened read-only here; write with shards.storage")
    return open_shard(url)


def register_webdataset_s3() -> None:
    """Let webdataset open s3:// URLs through shards.storage (idempotent)."""
    import importlib

    gopen_module = importlib.import_module("webdataset.gopen")  # the module, not the function of that name
    gopen_module.gopen_schemes["s3"] = _gopen_s3


register_webdataset_s3()


@dataclass(frozen=True)
class Preflight:
    ok: bool
    num_shards: int
    readers: int
    message: str

    def __bool__(self) -> bool:
        return self.ok


def preflight(dataset_url: str, *, world_size: int, workers_per_rank: int) -> Preflight:
    """Can every rank and data-loader worker get at least one shard?

    WebDataset splits shards by rank, then by worker; with fewer shards than ranks x workers
    some readers get none and DDP waits forever on the rank that ran out. Says what to do.
    """
    if world_size < 1 or workers_per_rank < 0:
        raise ValueError("world_size must be >= 1 and workers_per_rank >= 0")
    manifest = load_manifest(dataset_url)
    num = len(manifest["shards"])
    readers = world_size * max(1, workers_per_rank)
    if num >= readers:
        uneven = num % readers
        note = (f"; {uneven} reader(s) get one shard more than the others (use a multiple of {readers} shards "
                "for even epochs)") if uneven else ""
        return Preflight(True, num, readers, f"ok: {num} shards for {world_size} rank(s) x "
                                             f"{max(1, workers_per_rank)} worker(s) = {readers} readers{note}")
    samples = int(manifest.get("num_samples", 0))
    size = max(1, samples // readers)
    max_workers = max(0, num // world_size)
    fixes = [f"re-shard with --shard-size {size} (or smaller) to get >= {readers} shards"]
    if max_workers >= 1:
        fixes.append(f"use <= {max_workers} data-loader workers per rank")
    if num >= 1:
        fixes.append(f"or use <= {num} ranks")
    return Preflight(False, num, readers,
                     f"{num} shard(s) < {world_size} rank(s) x {max(1, workers_per_rank)} worker(s) = {readers} readers: "
                     "some readers would get no shard and DDP would hang; " + "; ".join(fixes))
