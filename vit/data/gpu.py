"""The GPU decode path (``data.decode: gpu``): JPEGs are decoded and cropped on the training device.

The DataLoader workers do what costs little per byte: read the tar member, parse the image
header (PIL, no pixels), draw the crop box and flip from the sample's Generator with the CPU
path's own ``transform.params``, and ship the encoded bytes (``DeviceCrop``). The rank decodes
the batch's JPEGs in one ``torchvision.io.decode_jpeg(list, device=...)`` call (nvJPEG on CUDA)
and crops, resizes and flips each one on the device with ``crop_resize_tensor``: PIL's bilinear
resampling of the same fractional box (triangle filter widened when shrinking, as
``Image.resize(box=...)`` does) written as two matrix products, so the geometry is the CPU
path's, box for box. Pixels differ only by what the decoders differ by (the CPU path decodes
big JPEGs at a reduced DCT scale, ``Image.draft``) and by PIL's 8-bit rounding between its two
passes (at most 1 level).

Samples that are not baseline RGB or greyscale JPEGs (PNG, WebP, CMYK JPEG) are decoded on the
CPU in the worker exactly as on the CPU path and join the batch as pixels. A JPEG whose header
parses but whose data the device decoder refuses is decoded on the CPU with the same box; if
that fails too, its slot is filled with a neighbour and counted as corrupt, as on the CPU path.

On a machine without CUDA the same code runs with ``device="cpu"`` (torchvision's CPU decoder):
that is how it is tested here. The CUDA call itself is UNVERIFIED ON GPU (none was available).
torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec (a DeprecationWarning);
``decode_jpeg`` is still the batched nvJPEG entry point it ships.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vit.augment import crop_resize, open_image

DECODE_MODES = ("cpu", "gpu", "auto")


@dataclass(frozen=True)
class DeviceCrop:
    """A JPEG for the device decoder: its bytes and the crop the CPU path would take."""

    data: bytes
    box: tuple[float, float, float, float]
    flip: bool


def resolve_decode(mode: str, *, cuda: bool | None = None) -> str:
    """``cpu`` | ``gpu``: ``auto`` decodes on the GPU when CUDA is present, else on the CPU."""
    if mode not in DECODE_MODES:
        raise ValueError(f"data.decode={mode!r} is not one of {list(DECODE_MODES)}")
    if mode != "auto":
        return mode
    return "gpu" if (torch.cuda.is_available() if cuda is None else cuda) else "cpu"


def prepare(data: bytes, img, *, transform, rng) -> DeviceCrop | torch.Tensor:
    """A worker's share of one image (``img``: ``data`` opened, header only): a ``DeviceCrop`` for RGB /
    greyscale JPEGs, else the CPU path's pixels (``uint8 Tensor[S, S, 3]``). The Generator is used exactly
    as the CPU path uses it, so the crop is the same."""
    if img.format == "JPEG" and img.mode in ("RGB", "L"):
        box, flip = transform.params(*img.size, rng)
        return DeviceCrop(data=data, box=box, flip=flip)
    return torch.from_numpy(np.array(transform(img, rng)))  # a writable copy (PIL arrays are read-only)


def resample_weights(in_size: int, lo: float, hi: float, out_size: int) -> torch.Tensor:
    """``float64 [out_size, in_size]``: PIL's bilinear weights for resizing ``[lo, hi)`` of an axis to
    ``out_size`` pixels (Resample.c ``precompute_coeffs``: support 1 x max(1, scale), rows sum to 1)."""
    scale = (hi - lo) / out_size
    filterscale = max(scale, 1.0)
    support = filterscale
    center = lo + (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale
    first = torch.clamp(torch.floor(center - support + 0.5), min=0)  # PIL truncates (x + 0.5); x >= 0 here
    last = torch.clamp(torch.floor(center + support + 0.5), max=in_size)
    j = torch.arange(in_size, dtype=torch.float64)
    w = torch.clamp(1 - ((j[None] - center[:, None] + 0.5) / filterscale).abs(), min=0)
    w = w * ((j[None] >= first[:, None]) & (j[None] < last[:, None]))
    return w / w.sum(1, keepdim=True).clamp(min=1e-12)


def crop_resize_tensor(image: torch.Tensor, box, flip: bool, *, size: int) -> torch.Tensor:
    """``uint8 [3, H, W]`` on any device -> ``uint8 [3, size, size]``: crop ``box`` (full-resolution pixel
    coordinates, fractional), resize bilinearly as PIL does, mirror left-right when ``flip``."""
    _, h, w = image.shape
    rows = resample_weights(h, box[1], box[3], size).to(image.device, torch.float32)
    cols = resample_weights(w, box[0], box[2], size).to(image.device, torch.float32)
    if flip:
        cols = cols.flip(0)
    out = torch.einsum("sh,chw,tw->cst", rows, image.to(torch.float32), cols)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _decode_jpegs(datas: list[bytes], device) -> list[torch.Tensor | None]:
    """Decode JPEG bytes on ``device`` in one batched call (UNVERIFIED ON GPU for device="cuda");
    when the batch call fails, one by one, ``None`` for the ones the decoder refuses."""
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    if not tensors:
        return []
    try:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        out = []
        for t in tensors:
            try:
                out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def finish_batch(items: list, *, size: int, device) -> tuple[torch.Tensor, list[int]]:
    """The rank's half of the GPU path: a batch of ``DeviceCrop`` / CPU pixels -> ``uint8 [B, 3, S, S]`` on
    ``device``, and the indices of items that could not be decoded at all (their rows are left zero)."""
    out = torch.zeros((len(items), 3, size, size), dtype=torch.uint8, device=device)
    jpegs = [i for i, item in enumerate(items) if isinstance(item, DeviceCrop)]
    bad = []
    for i, decoded in zip(jpegs, _decode_jpegs([items[i].data for i in jpegs], device)):
        item = items[i]
        if decoded is not None:
            out[i] = crop_resize_tensor(decoded, item.box, item.flip, size=size)
            continue
        try:  # the device decoder refused it: the CPU path's decoder, the same crop
            pixels = crop_resize(open_image(item.data), item.box, item.flip, size=size)
        except Exception:  # PIL raises many kinds on broken bytes
            bad.append(i)
            continue
        out[i] = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).to(device)
    for i, item in enumerate(items):
        if not isinstance(item, DeviceCrop):
            out[i] = item.permute(2, 0, 1).to(device)
    return out, bad
