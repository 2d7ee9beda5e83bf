"""Image checks and transforms with PIL + numpy: probe (validate, size, perceptual hash), resize.

`probe` decodes every image (JPEGs at 1/8 scale through libjpeg's DCT scaling, which still walks
the whole entropy-coded stream, so truncation and corruption are caught cheaply) and computes a
64-bit dHash used to find near-duplicates (re-encoded or resized copies).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from shards.errors import VitpipeError
from shards.format import IMAGE_FORMATS

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default bound; above it an image counts as a decompression bomb


class BadImage(VitpipeError, ValueError):
    """This record is not a usable image; the message is the skip reason."""


@dataclass(frozen=True, slots=True)
class Probe:
    ext: str
    width: int
    height: int
    dhash: int | None  # None when only the header was checked


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the SOF marker, or None if the marker walk fails."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _JPEG_SOF:
            if i + 9 > n:
                return None
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        if marker == 0xDA or length < 2:
            return None
        i += 2 + length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first chunk of a WebP: a lossy frame header, a lossless one, or the
    extended format's canvas."""
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def _quick_size(head: bytes, tail: bytes, size: int) -> tuple[tuple[int, int] | None, str | None]:
    """((width, height), ext) of a JPEG/PNG/WebP of `size` bytes from its first bytes and its complete
    end, else (None, None). Complete: the JPEG or PNG end marker is there; the WebP's RIFF header
    gives exactly `size`."""
    if head[:2] == b"\xff\xd8" and tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        return _jpeg_size(head), "jpg"
    if head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR" and tail.endswith(_PNG_END):
        return (int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")), "png"
    if (len(head) >= 30 and head[:4] == b"RIFF" and head[8:12] == b"WEBP"
            and int.from_bytes(head[4:8], "little") + 8 == size):
        return _webp_size(head), "webp"
    return None, None


def _header_checked(size: tuple[int, int], ext: str, max_pixels: int) -> Probe:
    if size[0] * size[1] > max_pixels:
        raise BadImage(f"decompression bomb ({size[0]}x{size[1]} pixels > limit {max_pixels})")
    return Probe(ext, size[0], size[1], None)


def header_probe(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Probe:
    """Cheap check for pass-through: JPEG/PNG/WebP headers parsed here, completeness by the end
    marker or the RIFF size (truncated files fail); anything unusual or another format falls back
    to a full decode."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    dims, ext = _quick_size(data, data, len(data))
    if dims is None or dims[0] <= 0 or dims[1] <= 0:
        full = probe(data, max_pixels=max_pixels)
        return Probe(full.ext, full.width, full.height, None)
    return _header_checked(dims, ext, max_pixels)


def header_probe_ends(head: bytes, tail: bytes, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Probe | None:
    """header_probe from a file's first bytes (`head`) and last bytes (`tail`, from a file of `size`
    bytes, longer than `head`): the answer header_probe would give on the whole file, or None when
    these bytes do not settle it (then read the whole file and ask header_probe). The JPEG marker walk reads from the
    start, so it finds the same size in a prefix as in the whole file, or runs out (None); an end
    marker before the tail (trailing padding longer than it) also leaves this undecided."""
    dims, ext = _quick_size(head, tail, size)
    if dims is None or dims[0] <= 0 or dims[1] <= 0:
        return None
    return _header_checked(dims, ext, max_pixels)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("decompression bomb (too many pixels)") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except Exception as err:  # PIL raises many types on garbage headers
        raise BadImage(f"corrupt image header ({type(err).__name__})") from None
    if image.format not in IMAGE_FORMATS:
        raise BadImage(f"unsupported image format {image.format}")
    width, height = image.size
    if width <= 0 or height <= 0:
        raise BadImage("image has no pixels")
    if width * height > max_pixels:
        raise BadImage(f"decompression bomb ({width}x{height} pixels > limit {max_pixels})")
    return image


def dhash(image: Image.Image) -> int:
    """64-bit difference hash: 9x8 grey thumbnail, one bit per horizontal neighbour comparison."""
    small = np.asarray(image.convert("L").resize((9, 8), Image.BOX), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


THUMB_SIZE = 8


def thumbnail(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The picture at THUMB_SIZE x THUMB_SIZE RGB (box-averaged, int16): what near-duplicate
    confirmation compares. dHash keeps only the signs of neighbour differences, which on flat
    images (skies, silhouettes, scans of paper) are noise; absolute colours at this scale are not."""
    image = _open(data, max_pixels)
    if image.format == "JPEG":
        image.draft("RGB", (THUMB_SIZE * 8, THUMB_SIZE * 8))
    return np.asarray(image.convert("RGB").resize((THUMB_SIZE, THUMB_SIZE), Image.BOX), dtype=np.int16)


def probe(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Probe:
    """Validate by decoding; raises BadImage with the skip reason."""
    image = _open(data, max_pixels)
    ext, (width, height) = IMAGE_FORMATS[image.format], image.size
    try:
        if image.format == "JPEG":
            image.draft("L", (min(width, max(72, width // 8)), min(height, max(64, height // 8))))
        image.load()
        value = dhash(image)
    except BadImage:
        raise
    except Exception as err:
        raise BadImage(f"corrupt or truncated image ({str(err).splitlines()[0][:80] or type(err).__name__})") from None
    return Probe(ext, width, height, value)


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """Shorter side to `shorter`, aspect kept, never upscaled."""
    short = min(width, height)
    if short <= shorter:
        return width, height
    scale = shorter / short
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_encode(data: bytes, *, shorter: int, quality: int, max_pixels: int = DEFAULT_MAX_PIXELS
                  ) -> tuple[bytes, str, int, int]:
    """Decode, resize (shorter side, never up), re-encode. Returns (bytes, ext, width, height).

    An image already small enough is passed through byte for byte. JPEG/WebP keep their format;
    PNG keeps PNG; other formats become JPEG (PNG when they carry transparency).
    """
    image = _open(data, max_pixels)
    fmt = image.format
    target = resized_size(*image.size, shorter)
    if target == image.size:
        return data, IMAGE_FORMATS[fmt], image.size[0], image.size[1]
    if fmt == "JPEG":
        image.draft("RGB", target)  # DCT-domain downscale to >= target, then a proper filter
    if image.getexif().get(0x0112, 1) != 1:  # EXIF orientation: turn the pixels upright (else no copy)
        image = ImageOps.exif_transpose(image)
    target = resized_size(*image.size, shorter)
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    out_fmt = fmt if fmt in ("JPEG", "PNG", "WEBP") else ("PNG" if has_alpha else "JPEG")
    if out_fmt == "JPEG":
        image = image if image.mode == "RGB" else image.convert("RGB")
    elif has_alpha:
        image = image.convert("RGBA")
    elif image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    image = image.resize(target, Image.BICUBIC, reducing_gap=3.0)
    buffer = io.BytesIO()
    if out_fmt == "JPEG":
        image.save(buffer, "JPEG", quality=quality, optimize=False)
    elif out_fmt == "WEBP":
        image.save(buffer, "WEBP", quality=quality, method=4)
    else:
        image.save(buffer, "PNG", compress_level=6)
    return buffer.getvalue(), IMAGE_FORMATS[out_fmt], image.size[0], image.size[1]


def decode_check(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Full decode (used by verify): (width, height) or BadImage."""
    image = _open(data, max_pixels)
    try:
        image.load()
    except Exception as err:
        raise BadImage(f"not decodable ({str(err).splitlines()[0][:80] or type(err).__name__})") from None
    return image.size
