"""Real-image corpora for tests and benchmarks, built from photographs that ship with scikit-image
(crops of them; nothing is downloaded), plus deliberately broken files."""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "camera", "coins", "moon",
           "page", "text", "clock", "horse", "hubble_deep_field", "logo")


def photographs() -> list[np.ndarray]:
    """The scikit-image sample photographs available offline, as RGB uint8 arrays."""
    from skimage import data

    out = []
    for name in _PHOTOS:
        try:
            image = np.asarray(getattr(data, name)())
        except Exception:  # a photo that would need a download: leave it out
            continue
        if image.dtype != np.uint8:
            image = (255 * (image.astype(np.float64) / max(1, image.max()))).astype(np.uint8)
        if image.ndim == 2:
            image = np.stack([image] * 3, -1)
        out.append(image[..., :3])
    return out


def photo_crops(count: int, *, size: tuple[int, int] = (160, 120), seed: int = 0) -> list[Image.Image]:
    """`count` distinct crops (random position, scale and flip) of the sample photographs."""
    rng = np.random.default_rng(seed)
    photos = photographs()
    w, h = size
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        ph, pw = photo.shape[:2]
        scale = rng.uniform(0.3, 1.0)
        cw, ch = max(8, int(min(pw, ph * w / h) * scale)), 0
        ch = max(8, int(cw * h / w))
        x, y = rng.integers(0, pw - cw + 1), rng.integers(0, ph - ch + 1)
        crop = Image.fromarray(photo[y:y + ch, x:x + cw]).resize((w, h), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out.append(crop)
    return out


# Distinct low-texture pictures (skies, silhouettes, documents, plain colours) from the images that
# ship with scikit-image and scikit-learn: (image, grid, row, column) names one cell of a grid x grid cut,
# grid 1 the whole image. Hand-picked: each shows something else (the clock's plain wall appears once).
LOW_TEXTURE = (
    ("moon", 1, 0, 0), ("moon", 3, 0, 1), ("moon", 3, 0, 2), ("moon", 3, 1, 0), ("moon", 3, 1, 1), ("moon", 3, 1, 2),
    ("moon", 3, 2, 0), ("moon", 3, 2, 2), ("page", 3, 2, 2), ("text", 3, 0, 2), ("text", 3, 2, 2),
    ("rocket", 3, 0, 0), ("rocket", 3, 0, 1), ("rocket", 3, 0, 2), ("rocket", 3, 1, 0), ("rocket", 3, 1, 2),
    ("camera", 3, 0, 2), ("camera", 3, 2, 2), ("hubble_deep_field", 1, 0, 0), ("hubble_deep_field", 3, 0, 0),
    ("hubble_deep_field", 3, 0, 2), ("hubble_deep_field", 3, 2, 2), ("clock", 3, 0, 0), ("clock", 3, 0, 1),
    ("clock", 3, 0, 2), ("clock", 3, 1, 2), ("clock", 3, 2, 1), ("clock", 3, 2, 2), ("china.jpg", 3, 0, 2),
    ("flower.jpg", 3, 0, 2), ("colorwheel", 3, 0, 1), ("horse", 1, 0, 0), ("horse", 4, 0, 0), ("horse", 4, 1, 1),
    ("horse", 4, 3, 1), ("logo", 4, 0, 0), ("logo", 4, 3, 3),
)


def low_texture_images() -> dict[str, Image.Image]:
    """The LOW_TEXTURE cells as RGB images, named "image/grid-row-column"."""
    from skimage import data
    from sklearn.datasets import load_sample_image

    out = {}
    for name, grid, row, col in LOW_TEXTURE:
        image = load_sample_image(name) if name.endswith(".jpg") else np.asarray(getattr(data, name)())
        if image.dtype != np.uint8:
            image = (255 * (image.astype(np.float64) / max(1, image.max()))).astype(np.uint8)
        if image.ndim == 2:
            image = np.stack([image] * 3, -1)
        h, w = image.shape[:2]
        cell = image[row * h // grid:(row + 1) * h // grid, col * w // grid:(col + 1) * w // grid, :3]
        out[f"{name.split('.')[0]}/{grid}-{row}-{col}"] = Image.fromarray(np.ascontiguousarray(cell))
    return out


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        kw.setdefault("quality", 90)
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


def write_jpeg_tree(root: str | os.PathLike, *, count: int, classes: int = 10, size=(160, 120), seed: int = 0,
                    quality: int = 90) -> Path:
    """`count` JPEG crops spread over `classes` class folders (benchmark corpus)."""
    root = Path(root)
    crops = photo_crops(min(count, 512), size=size, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for i in range(count):
        folder = root / f"class_{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        image = crops[i % len(crops)]
        if i >= len(crops):  # keep every file distinct: a small random shift of the colours
            arr = np.asarray(image).astype(np.int16) + rng.integers(-6, 7, size=3)
            image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        (folder / f"img_{i:07d}.jpg").write_bytes(encode(image, "JPEG", quality=quality))
    return root
