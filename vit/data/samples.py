"""One sample: its labels checked, its image decoded and transformed; targets for a batch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from shards.errors import VitpipeError
from shards.format import image_ext
from vit.augment import open_image

class CorruptSample(VitpipeError, ValueError):
    """A sample that cannot be used (bad image bytes, missing or invalid label)."""


@dataclass(frozen=True)
class LabelSpec:
    num_classes: int
    multi_label: bool  # the targets' form: multi-hot (sigmoid) or class index (softmax)


def parse_labels(sample: dict, spec: LabelSpec) -> list[int]:
    """The sample's label ids from ``.cls`` (ascii int) or ``.json`` ``labels``; checked against the class count."""
    if "json" in sample:
        import json

        try:
            meta = json.loads(sample["json"])
        except ValueError as err:
            raise CorruptSample(f"invalid .json ({err})") from None
        labels = meta.get("labels") if isinstance(meta, dict) else None
        if labels is None and "cls" not in sample:
            raise CorruptSample(".json has no 'labels'")
    else:
        labels = None
    if labels is None:
        if "cls" not in sample:
            raise CorruptSample("no .cls or .json label")
        try:
            labels = [int(sample["cls"].strip())]
        except ValueError:
            raise CorruptSample(f"invalid .cls {sample['cls'][:20]!r}") from None
    if not isinstance(labels, list) or not all(isinstance(x, int) and 0 <= x < spec.num_classes for x in labels):
        raise CorruptSample(f"labels {str(labels)[:60]} not ids in [0, {spec.num_classes})")
    if not spec.multi_label and len(labels) != 1:
        raise CorruptSample(f"{len(labels)} labels on a single-label (softmax) dataset")
    return labels


def decode_sample(sample: dict, *, transform, rng, spec: LabelSpec, prepare=None) -> tuple[object, list[int]]:
    """Raw tar sample -> (uint8 image [S,S,3], label ids). Raises CorruptSample.

    ``prepare(data, image, transform=, rng=)`` replaces the decode (the GPU path's workers:
    ``vit.data.gpu.prepare``); the image is then opened (header parsed) but not decoded here.
    """
    if "__error__" in sample:
        raise CorruptSample(sample["__error__"])
    ext = image_ext(sample)
    if ext is None:
        raise CorruptSample(f"no image member (has {sorted(k for k in sample if k != '__key__')})")
    labels = parse_labels(sample, spec)
    try:
        image = open_image(sample[ext])
        image = transform(image, rng) if prepare is None else prepare(sample[ext], image, transform=transform, rng=rng)
    except Exception as err:  # PIL raises many kinds on broken bytes
        raise CorruptSample(f"undecodable .{ext} ({type(err).__name__}: {err})") from None
    return image, labels


def targets_tensor(labels: Sequence[list[int]], spec: LabelSpec) -> torch.Tensor:
    if not spec.multi_label:
        return torch.tensor([ls[0] for ls in labels], dtype=torch.long)
    out = torch.zeros(len(labels), spec.num_classes, dtype=torch.float32)
    for row, ls in enumerate(labels):
        out[row, ls] = 1.0
    return out
