"""Image transforms of the input pipeline: the paper's inception crop + flip, and resize + centre crop.

Every transform takes an *unloaded* PIL image (header read, pixels not yet decoded) and a
numpy Generator, and returns a ``uint8`` array ``[S, S, 3]`` (HWC, as PIL gives it). Where the
crop goes and whether it is flipped is ``transform.params(width, height, rng)``, a pure function
of the image size and the Generator: the CPU path (here) and the GPU decode path
(``vit.data.gpu``) both call it, so they crop the same boxes from the same seeds.
``stack_images`` packs a batch into ``uint8 [B, 3, S, S]`` stored channels-last (the HWC pixels
as PIL gives them, one copy, no transpose); batches stay uint8 up to the device, where
``normalize`` turns them into floats (4x less memory traffic than float32 on the CPU side).

Crop and resize are one PIL operation (``Image.resize(box=...)``), and JPEGs are decoded at a
reduced DCT scale (``Image.draft``) whenever the crop still has at least ``S`` pixels per side
after the reduction, so a small crop of a big photo does not pay for a full-size decode.

The randomness comes only from the Generator the caller passes; ``vit.data`` seeds it from
(seed, epoch, global position), so the same sample at the same position gets the same crop
whatever the number of ranks or workers.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange
from PIL import Image

# The paper's code (vit_jax input_pipeline) maps pixels to [-1, 1]: (x - 127.5) / 127.5.
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)


def open_image(data: bytes) -> Image.Image:
    """Open encoded image bytes lazily (pixels are decoded by the transform). Raises on garbage."""
    img = Image.open(io.BytesIO(data))
    img.size  # noqa: B018  (header parsed; raises UnidentifiedImageError on non-images)
    return img


def crop_resize(img: Image.Image, box: tuple[float, float, float, float], flip: bool, *, size: int) -> np.ndarray:
    """Crop ``box`` (in full-resolution pixel coordinates), resize it to ``size`` x ``size`` and mirror it
    left-right when ``flip``: ``uint8 [size, size, 3]``. (PIL mirrors: a reversed numpy view made
    ``np.stack`` of the batch about 8x slower, copying 3 bytes at a time.)"""
    out = _crop_resize(img, box, size)
    return np.asarray(out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out)


def _crop_resize(img: Image.Image, box: tuple[float, float, float, float], size: int) -> Image.Image:
    full_w, full_h = img.size
    crop_w, crop_h = box[2] - box[0], box[3] - box[1]
    if img.format == "JPEG":
        # decode at 1/2, 1/4 or 1/8 scale when the crop keeps >= size pixels per side
        img.draft("RGB", (max(1, math.ceil(full_w * size / crop_w)), max(1, math.ceil(full_h * size / crop_h))))
    rx, ry = img.size[0] / full_w, img.size[1] / full_h
    if img.mode != "RGB":
        img = img.convert("RGB")
    box = (box[0] * rx, box[1] * ry, box[2] * rx, box[3] * ry)
    return img.resize((size, size), Image.BILINEAR, box=box)


def stack_images(images: list[np.ndarray]) -> torch.Tensor:
    """HWC uint8 arrays of one size -> ``uint8 Tensor[B, 3, H, W]`` in channels-last memory (one copy)."""
    return rearrange(torch.from_numpy(np.stack(images)), "b h w c -> b c h w")


def normalize(images: torch.Tensor, *, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``uint8 [B,3,H,W]`` -> ``float32`` ((x / 255) - mean) / std, on the images' device."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return images.to(torch.float32).mul_(scale).sub_(shift)


def inception_crop_box(
    width: int, height: int, rng: np.random.Generator, *, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[float, float, float, float]:
    """A random box covering ``scale`` of the area with aspect ratio in ``ratio`` (log-uniform).

    The sampling of the paper's inception crop (TF ``sample_distorted_bounding_box`` with
    ``area_range=(0.05, 1)``) as torchvision's RandomResizedCrop does it: ten tries, then the
    largest centred box with an admissible aspect ratio.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = math.sqrt(target * aspect)
        h = math.sqrt(target / aspect)
        if 1 <= w <= width and 1 <= h <= height:
            left = rng.uniform(0, width - w)
            top = rng.uniform(0, height - h)
            return (left, top, left + w, top + h)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, width / ratio[0]
    elif in_ratio > ratio[1]:
        w, h = height * ratio[1], height
    else:
        w, h = width, height
    left, top = (width - w) / 2, (height - h) / 2
    return (left, top, left + w, top + h)


@dataclass(frozen=True)
class InceptionCrop:
    """Random resized crop + horizontal flip: the paper's pre-training and fine-tuning augmentation."""

    img_size: int
    scale: tuple[float, float] = (0.05, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def __post_init__(self):
        if self.img_size <= 0:
            raise ValueError(f"img_size must be positive, got {self.img_size}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"crop ratio must satisfy 0 < min <= max, got {self.ratio}")

    def params(self, width: int, height: int, rng: np.random.Generator) -> tuple[tuple[float, ...], bool]:
        """(crop box, flip) for an image of ``width`` x ``height``: the box first, then the coin."""
        box = inception_crop_box(width, height, rng, scale=self.scale, ratio=self.ratio)
        return box, bool(self.flip and rng.random() < 0.5)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        return crop_resize(img, *self.params(*img.size, rng), size=self.img_size)


@dataclass(frozen=True)
class ResizeCenterCrop:
    """Resize the shorter side to ``img_size / crop_pct``, then take the centred ``img_size`` square.

    ``crop_pct=0.875`` is the usual ImageNet evaluation (256 -> 224); ``crop_pct=1.0`` keeps
    the whole shorter side.
    """

    img_size: int
    crop_pct: float = 0.875

    def __post_init__(self):
        if self.img_size <= 0:
            raise ValueError(f"img_size must be positive, got {self.img_size}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")

    def params(self, width: int, height: int, rng: np.random.Generator | None = None) -> tuple[tuple[float, ...], bool]:
        side = min(width, height) * self.crop_pct  # in original pixels: the centred square we keep
        left, top = (width - side) / 2, (height - side) / 2
        return (left, top, left + side, top + side), False

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        return crop_resize(img, *self.params(*img.size), size=self.img_size)


AUGMENTS = ("pretrain", "finetune", "crop", "none")


def build_transform(kind: str, *, img_size: int, crop_pct: float = 0.875):
    """``pretrain`` / ``finetune``: inception crop + flip (the paper's code uses one training
    transform for both); ``crop``: random resized crop of 25-100 % of the area, no flip (for images
    that a mirror changes, such as digits: a zoom of up to 2x, so the model sees its patches at
    more than one scale); ``none``: deterministic resize + centre crop."""
    if kind in ("pretrain", "finetune"):
        return InceptionCrop(img_size=img_size)
    if kind == "crop":
        return InceptionCrop(img_size=img_size, scale=(0.25, 1.0), flip=False)
    if kind == "none":
        return ResizeCenterCrop(img_size=img_size, crop_pct=crop_pct)
    raise ValueError(f"augment={kind!r} is not known; use one of {', '.join(AUGMENTS)}")
