"""scikit-learn's digits (1,797 real 8x8 scans, 10 classes) written as an ImageNet-style tree.

The data ships inside scikit-learn: nothing is downloaded. `ROOT/<class>/<key>.png`, class
folders "0".."9", keys `digit_NNNN`. A fixed split: every 5th image is `val`, the rest `train`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

SPLITS = (None, "train", "val")


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 8, 8] scaled to 0..255, labels int [N])."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.clip(np.rint(data.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, data.target.astype(np.int64)


def in_split(index: int, split: str | None) -> bool:
    if split is None:
        return True
    return (index % 5 == 0) == (split == "val")


def write_digits_tree(root: str | os.PathLike, *, split: str | None = None, size: int = 32,
                      limit: int | None = None, digits: Iterable[int] | None = None, parity: bool = False) -> Path:
    """Write the digits as `root/<class>/<key>.png` (RGB, upscaled to `size` px); returns `root`.

    `digits`: only these digits (e.g. range(5, 10)); `parity`: class folders "even" / "odd" instead of
    the digit (a task that is a function of the digit)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use None, 'train' or 'val'")
    if size < 8:
        raise ValueError(f"size={size}: must be >= 8 (the digits are 8x8)")
    root = Path(root)
    images, labels = digits_arrays()
    written = 0
    keep = None if digits is None else {int(d) for d in digits}
    for index, (pixels, label) in enumerate(zip(images, labels)):
        if not in_split(index, split) or (keep is not None and int(label) not in keep):
            continue
        if limit is not None and written >= limit:
            break
        folder = root / (("even", "odd")[int(label) % 2] if parity else str(int(label)))
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR).convert("RGB")
        image.save(folder / f"digit_{index:04d}.png", optimize=False)
        written += 1
    return root
