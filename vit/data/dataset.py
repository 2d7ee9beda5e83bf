"""What the input pipeline reads from a dataset's ``manifest.json``: its shards, classes and labels."""
from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

import torch

from shards.errors import VitpipeError


class StreamError(VitpipeError, ValueError):
    """A stream cannot be set up as asked (batch size, lanes, world size, label mode, resume
    position); the message says what to set."""

@dataclass(frozen=True)
class ShardInfo:
    url: str
    samples: int


@dataclass(frozen=True)
class DatasetInfo:
    """What the pipeline needs from ``manifest.json``."""

    url: str
    shards: tuple[ShardInfo, ...]
    classes: tuple[str, ...]
    label_histogram: tuple[int, ...]
    multi_label: bool

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_dataset_info(dataset_url: str) -> DatasetInfo:
    """Read the manifest of ``dataset_url`` (local folder or ``s3://`` prefix); its fields are checked
    by ``shards.format.validate_manifest`` (a DatasetError names the file and field)."""
    from shards.reader import load_manifest, shard_urls

    manifest = load_manifest(dataset_url)
    shards = tuple(ShardInfo(url=url, samples=entry["samples"])
                   for url, entry in zip(shard_urls(dataset_url, manifest), manifest["shards"]) if entry["samples"])
    classes = tuple(str(c) for c in manifest["classes"])
    return DatasetInfo(
        url=str(dataset_url),
        shards=shards,
        classes=classes,
        label_histogram=tuple(int(c) for c in manifest.get("label_histogram") or [0] * len(classes)),
        multi_label=manifest.get("multi_label", False),
    )


def _open_shard(url: str) -> BinaryIO:
    from shards.reader import open_shard

    return open_shard(url)


def _label_mode(label_mode: str, info: DatasetInfo) -> bool:
    """True for sigmoid (multi-hot targets)."""
    if label_mode == "auto":
        return info.multi_label
    if label_mode == "sigmoid":
        return True
    if label_mode == "softmax":
        if info.multi_label:
            raise StreamError(
                f"label_mode='softmax' but {info.url}/manifest.json says multi_label: true; "
                "use label_mode='sigmoid' (or 'auto') for multi-label data"
            )
        return False
    raise StreamError(f"label_mode={label_mode!r} is not known; use 'auto', 'softmax' or 'sigmoid'")


def _label_prior(info: DatasetInfo, multi_label: bool) -> torch.Tensor:
    counts = torch.tensor(info.label_histogram, dtype=torch.float64)
    denom = info.num_samples if multi_label else counts.sum().item()
    return (counts / max(denom, 1)).to(torch.float32)
