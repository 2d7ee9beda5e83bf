"""The shard format, in one place: what a sample is, the image extensions, writing and reading
the tar, and what a manifest must hold.

A dataset is `<prefix>/manifest.json` + `<prefix>/<name>-NNNNNN.tar`. A sample in a tar is
`<key>.<ext>` (the image; `ext` from IMAGE_EXTS), `<key>.cls` (ASCII class id; single-label only)
and `<key>.json` (`{"classes", "height", "labels", "path", "width"}`, sorted keys). The key is the
member name up to the first dot of its file name (WebDataset's rule). Members are regular files,
mode 0444, owner 0/0, mtime MTIME: the same samples give byte-identical shards.

Writing: `TarWriter` lays out a chunk of samples at a time (headers and small members with a few
array operations, images read straight into their place). Reading: `TarMembers`, a lean header
parser, and `iter_samples` on it. `validate_manifest` checks a manifest's fields before anything
reads it.
"""
from __future__ import annotations

import hashlib
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from json.encoder import encode_basestring  # what json.dumps(..., ensure_ascii=False) uses for strings
from typing import BinaryIO, Iterator

import numpy as np

from shards.errors import VitpipeError

MANIFEST = "manifest.json"
FORMAT = "vitpipe-webdataset"
FORMAT_VERSION = 1

# PIL format -> the extension its images carry in a tar (webdataset decodes by extension)
IMAGE_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff", "PPM": "ppm"}
# THE image extensions: what the writer gives (first, in IMAGE_FORMATS order: shard tasks store
# indices into this tuple), then the other spellings a reader takes as an image member
IMAGE_EXTS = (*IMAGE_FORMATS.values(), "jpeg", "tif", "pgm", "pbm")


def image_ext(exts) -> str | None:
    """The first extension among `exts` (a sample dict's keys, or a set of extensions) that is an image."""
    return next((ext for ext in IMAGE_EXTS if ext in exts), None)


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's convention: the key is the path up to the first dot of the file name."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


class DatasetError(VitpipeError, RuntimeError):
    """The dataset cannot be read; the one-line message names the file and field and what to fix."""


# ----------------------------------------------------------------------------- writing a tar

MTIME = 946684800  # 2000-01-01: every member gets the same timestamp, so shards are byte-identical


def _ustar_template() -> tuple[np.ndarray, int]:
    """A ustar header of a regular file (mode 0444, owner 0/0, mtime MTIME) with the name, size and
    checksum fields empty, and the byte sum of its fixed fields with the checksum counted as spaces."""
    header = bytearray(512)
    header[100:108] = b"0000444\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[136:148] = b"%011o\0" % MTIME
    header[148:156] = b"        "
    header[156:157] = b"0"
    header[257:265] = b"ustar\x0000"
    total = sum(header)
    header[148:156] = bytes(8)
    return np.frombuffer(bytes(header), dtype=np.uint8), total


_USTAR, _USTAR_SUM = _ustar_template()
_SIZE_SHIFTS = np.arange(30, -1, -3)  # the 11 octal digits of the size field
_SUM_SHIFTS = np.arange(15, -1, -3)  # the 6 of the checksum
_MAX_USTAR_SIZE = 8 ** 11


def ustar_headers(names: list[str] | list[bytes], sizes: np.ndarray) -> np.ndarray:
    """[m, 512] uint8: the ustar header of each regular file member, for ASCII `names` of at most
    100 bytes and sizes below 8 GiB (see tar_header), built for all members at once."""
    m = len(names)
    out = np.empty((m, 512), dtype=np.uint8)
    out[:] = _USTAR
    out[:, :100] = np.array(names, dtype="S100").view(np.uint8).reshape(m, 100)
    size_digits = ((np.asarray(sizes, dtype=np.int64)[:, None] >> _SIZE_SHIFTS) & 7) + 48
    out[:, 124:135] = size_digits
    checksum = _USTAR_SUM + out[:, :100].sum(axis=1, dtype=np.int64) + size_digits.sum(axis=1)
    out[:, 148:154] = ((checksum[:, None] >> _SUM_SHIFTS) & 7) + 48
    out[:, 155] = 32  # "%06o\0 "
    return out


def tar_header(name: str, size: int) -> bytes:
    """The header block(s) of a regular file member: fixed mode 0444, owner 0/0, mtime MTIME.

    Plain ASCII names up to 100 bytes get a ustar header; other names go through tarfile's PAX
    encoder, which is deterministic for the same fields."""
    encoded = name.encode("utf-8")
    if len(encoded) > 100 or not name.isascii() or size >= _MAX_USTAR_SIZE:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, MTIME, 0o444, 0, 0, "", ""
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    return ustar_headers([encoded], np.array([size])).tobytes()


def _header_blocks(names: list[str], sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The header blocks of members `names` of `sizes`, in order ([r, 512] uint8), and how many
    blocks each one has (1 for ustar; more for PAX)."""
    joined = "".join(names)
    if joined.isascii() and max(map(len, names)) <= 100 and int(sizes.max()) < _MAX_USTAR_SIZE:
        return ustar_headers(names, sizes), np.ones(len(names), dtype=np.int64)
    headers = [tar_header(name, int(size)) for name, size in zip(names, sizes)]
    blocks = np.frombuffer(b"".join(headers), dtype=np.uint8).reshape(-1, 512)
    return blocks, np.array([len(h) // 512 for h in headers], dtype=np.int64)


def _blocks_of(payloads: list[bytes]) -> np.ndarray:
    """[b, 512] uint8: the payloads one after another, each zero-padded to whole blocks."""
    if max(map(len, payloads)) > 512 or not all(payloads):  # rare (a long path, many labels): cut into blocks
        payloads = [p[i:i + 512] for p in payloads for i in range(0, len(p), 512)]
    return np.array(payloads, dtype="S512").view(np.uint8).reshape(-1, 512)


class SampleMetadata:
    """The small members of each sample: `cls` (single-label: the class id) and `json`, which is byte
    for byte json.dumps({"labels", "classes", "path", "width", "height"}, sort_keys=True,
    ensure_ascii=False); its label part is built once per distinct label set, the path goes through
    json's own string encoder."""

    def __init__(self, classes: list[str], multi_label: bool):
        self._classes, self._multi_label = classes, multi_label
        self._labels: dict[tuple[int, ...], tuple[str, str, bytes]] = {}

    def __call__(self, labels: tuple[int, ...], path: str, width: int, height: int) -> tuple[bytes, ...]:
        """The payloads of one sample's small members: (cls, json), or (json,) when multi-label."""
        pieces = self._labels.get(labels)
        if pieces is None:
            head = '{"classes": [%s], "height": ' % ", ".join(encode_basestring(self._classes[i]) for i in labels)
            middle = ', "labels": [%s], "path": ' % ", ".join(str(i) for i in labels)
            pieces = self._labels[labels] = (head, middle, str(labels[0]).encode("ascii"))
        head, middle, cls = pieces
        meta = ('%s%d%s%s, "width": %d}' % (head, height, middle, encode_basestring(path), width)).encode("utf-8")
        return (meta,) if self._multi_label else (cls, meta)


class TarWriter:
    """The shard's tar file, written a chunk of samples at a time. Each chunk is laid out in one
    buffer of 512-byte blocks: the headers and small members of all its samples are placed in a few
    array operations, each image is read (or copied) straight into its place; the buffer is then
    written with one call and fed to the shard's sha256. With `hash_in_thread` that runs in a thread
    (hashlib lets go of the GIL) while the next chunk is laid out and read into the other of two
    buffers. Use as a context manager (the thread ends with it)."""

    def __init__(self, fd: int, *, hash_in_thread: bool = False):
        self._fd = fd
        self._buffers = [np.empty(0, dtype=np.uint8), np.empty(0, dtype=np.uint8)]
        self._turn = 0
        self._digest = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="shard-sha256") if hash_in_thread else None
        self._hashing = None  # the hash of the last chunk written, while it runs
        self.bytes = 0

    def __enter__(self) -> "TarWriter":
        return self

    def __exit__(self, *exc) -> None:
        if self._hasher is not None:
            self._hasher.shutdown(wait=True)

    def layout(self, keys: list[str], exts: list[str], sizes: list[int], small: list[tuple[bytes, ...]]
               ) -> tuple[memoryview, list[int]]:
        """Lay out samples: `keys[i].exts[i]` (an image of sizes[i] bytes, left to the caller) then
        one member per payload in small[i] (named cls, json; or json alone). Returns the chunk's
        bytes and where each image goes in them."""
        per = len(small[0])
        suffixes = ("json",) if per == 1 else ("cls", "json")
        names = [f"{key}.{suffix}" for key, ext in zip(keys, exts) for suffix in (ext, *suffixes)]
        payloads = [payload for members in small for payload in members]
        member_sizes = np.empty((len(keys), per + 1), dtype=np.int64)  # per sample: the image, then its payloads
        member_sizes[:, 0] = sizes
        member_sizes[:, 1:] = np.fromiter(map(len, payloads), dtype=np.int64, count=len(payloads)).reshape(-1, per)
        member_sizes = member_sizes.ravel()
        header_rows, header_count = _header_blocks(names, member_sizes)
        data_count = -(-member_sizes // 512)
        start = np.cumsum(header_count + data_count) - header_count - data_count  # each member's first block
        total = int(start[-1] + header_count[-1] + data_count[-1])
        if self._hasher is not None:  # the buffer of the chunk before last, whose hash write() has waited for
            self._turn ^= 1
        buffer = self._buffers[self._turn]
        if len(buffer) < total * 512:
            buffer = self._buffers[self._turn] = np.empty(max(total * 512, 2 * len(buffer)), dtype=np.uint8)
        blocks = buffer[:total * 512].reshape(total, 512)
        if len(header_rows) == len(names):
            blocks[start] = header_rows
        else:  # some PAX headers: several blocks for a member
            first = np.repeat(start - np.cumsum(header_count) + header_count, header_count)
            blocks[first + np.arange(len(header_rows))] = header_rows
        data_start = start + header_count
        is_image = np.zeros(len(names), dtype=bool)
        is_image[::per + 1] = True
        small_rows = _blocks_of(payloads)
        small_first = np.repeat(data_start[~is_image] - np.cumsum(data_count[~is_image]) + data_count[~is_image],
                                data_count[~is_image])
        blocks[small_first + np.arange(len(small_rows))] = small_rows
        image_start, image_blocks = data_start[is_image], data_count[is_image]
        tails = image_start[image_blocks > 0] + image_blocks[image_blocks > 0] - 1
        blocks[tails] = 0  # an image's last block: zeros after its end
        return memoryview(buffer)[:total * 512], (image_start * 512).tolist()

    def write(self, data) -> None:
        if self._hashing is not None:
            self._hashing.result()  # the chunks reach the sha256 in order
        if self._hasher is None:
            self._digest.update(data)
        else:
            self._hashing = self._hasher.submit(self._digest.update, data)
        view = memoryview(data)
        while view:  # write may write less than asked: go on from where it stopped
            view = view[os.write(self._fd, view):]
        self.bytes += len(data)

    def finish(self) -> str:
        """Write the end of the archive; returns the shard's sha256 (hex)."""
        self.write(bytes(1024))  # end-of-archive: two zero blocks
        if self._hashing is not None:
            self._hashing.result()
        return self._digest.hexdigest()


# ----------------------------------------------------------------------------- reading a tar

_BLOCK = 512
_FILE_TYPES = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
_NO_DATA_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directory, fifo: no data follows
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")


def _tar_number(field: bytes) -> int:
    """A numeric header field: NUL/space-terminated octal, or GNU base-256 for big values."""
    if field[:1] in (b"\x80", b"\xff"):
        n = int.from_bytes(field[1:], "big")
        return n - (1 << (8 * (len(field) - 1))) if field[0] == 0xFF else n
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


class HashingReader:
    """A read-only stream wrapper that hashes (sha256) and counts every byte that passes through it
    (verify and index check a whole shard, tar end padding included, in one read)."""

    def __init__(self, stream):
        self.stream, self.digest, self.bytes = stream, hashlib.sha256(), 0

    def seekable(self) -> bool:
        return False  # every byte goes through the hash

    def read(self, n=-1):
        data = self.stream.read(n)
        self.digest.update(data)
        self.bytes += len(data)
        return data


class TarMembers:
    """The regular-file members of a tar stream, as ``(name, size)``; ``read()`` gives the current one's bytes.

    A lean header parser for what shards hold (ustar, pax ``path``/``size`` records, GNU long
    names), several times cheaper per member than ``tarfile``, whose member objects the
    pipeline never needed. It ends and fails where ``tarfile`` does: an empty or invalid
    first header raises ``tarfile.ReadError``; a zero block, a short or invalid header later
    ends the archive (unless it follows a long-name/pax header); data cut short (read or
    skipped) raises ``tarfile.ReadError``. ``tests/test_shards_format.py`` checks this against
    ``tarfile`` on every format and cut. Not read: sparse and multi-volume members (skipped).
    Members that are not read are seeked over on a seekable stream and read past otherwise.
    """

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self._seekable = stream.seekable()
        self._unread = 0  # bytes of the current member (data + padding) not consumed yet
        self._size = -1  # size of the current member while its data is unread, else -1
        self._headers = 0
        self._global_pax: dict[str, str] = {}
        self.others: list[str] = []  # names of the members passed over: links, folders, devices

    def __iter__(self) -> TarMembers:
        return self

    def read(self) -> bytes:
        """The current member's data (once)."""
        if self._size < 0:
            raise ValueError("TarMembers.read(): no current member, or its data was read already")
        data = self._stream.read(self._size)
        if len(data) != self._size:
            raise tarfile.ReadError("unexpected end of data")
        self._unread -= self._size
        self._size = -1
        return data

    def _skip(self, n: int) -> None:
        if n <= 0:
            return
        if self._seekable:  # like tarfile: the last byte skipped over must exist
            self._stream.seek(n - 1, 1)
            ok = len(self._stream.read(1)) == 1
        else:
            ok = True
            while n and ok:
                got = len(self._stream.read(min(n, 1 << 20)))
                ok, n = got > 0, n - got
            ok = ok and n == 0
        if not ok:
            raise tarfile.ReadError("unexpected end of data")

    def _header(self) -> bytes | None:
        """The next header block, or None at the end of the archive."""
        block = self._stream.read(_BLOCK)
        first = self._headers == 0
        self._headers += 1
        if len(block) < _BLOCK or block.count(0) == _BLOCK:
            if first and len(block) < _BLOCK:
                raise tarfile.ReadError("empty file" if not block else "truncated header")
            return None
        try:
            stored = _tar_number(block[148:156])
        except ValueError:
            stored = -1
        unsigned = 256 + sum(block) - sum(block[148:156])  # the checksum field counts as 8 spaces
        if stored != unsigned and stored != unsigned - 256 * sum(b > 127 for b in block[:148] + block[156:]):
            # (the second form: old tars summed signed bytes)
            if first:
                raise tarfile.ReadError("bad checksum")
            return None
        return block

    def __next__(self) -> tuple[str, int]:
        self._skip(self._unread)
        self._unread, self._size = 0, -1
        overrides: dict[str, str] = {}
        extended = False  # a GNU long name / pax header was read: the member header must follow
        while True:
            block = self._header()
            if block is None:
                if extended:
                    raise tarfile.ReadError("no valid member header after an extended header")
                raise StopIteration
            kind = block[156:157]
            try:
                size = _tar_number(block[124:136])
            except ValueError:
                if self._headers == 1 or extended:
                    raise tarfile.ReadError("invalid header") from None
                raise StopIteration from None
            padded = -(-size // _BLOCK) * _BLOCK
            extended = kind in (b"L", b"K", b"x", b"g")
            if kind in (b"L", b"x", b"g"):  # GNU long name, pax extended / global header: data is metadata
                data = self._stream.read(padded)
                if len(data) != padded:
                    raise tarfile.ReadError("unexpected end of data")
                if kind == b"L":
                    overrides["path"] = data[:size].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                else:
                    records = self._global_pax if kind == b"g" else overrides
                    records.update(_pax_records(data[:size]))
                continue
            if kind == b"K":  # GNU long link name: irrelevant for regular files
                self._skip(padded)
                continue
            fields = self._global_pax | overrides
            if "size" in fields:
                size = int(fields["size"])
                padded = -(-size // _BLOCK) * _BLOCK
            name = block[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            prefix = block[345:500].split(b"\0", 1)[0]
            if prefix and kind != b"S":
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
            name = fields.get("path", name)
            if kind in _FILE_TYPES and not (kind == b"\0" and name.endswith("/")):
                self._unread, self._size = padded, size
                return name, size
            self.others.append(name)
            self._unread = 0 if kind in _NO_DATA_TYPES else padded  # like tarfile: unknown types carry data
            self._skip(self._unread)
            self._unread = 0
            overrides, extended = {}, False


def _pax_records(data: bytes) -> dict[str, str]:
    """``"%d key=value\\n"`` records of a pax header."""
    out, pos = {}, 0
    while match := _PAX_RECORD.match(data, pos):
        length = int(match.group(1))
        if length <= 0:
            raise tarfile.ReadError("invalid pax header")
        value = data[match.end(2) + 1 : match.start(1) + length - 1]
        out[match.group(2).decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def iter_samples(stream: BinaryIO) -> Iterator[dict]:
    """The samples of a tar stream, in order: ``{"__key__": key, ext: bytes, ...}`` per sample."""
    members = TarMembers(stream)
    sample = None
    for name, _ in members:
        key, ext = split_name(name)
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key}
        sample[ext] = members.read()
    if sample is not None:
        yield sample


# ----------------------------------------------------------------------------- the manifest

_SHA256 = re.compile(r"[0-9a-f]{64}")


def validate_manifest(manifest, where: str) -> dict:
    """`manifest` if it has what readers rely on, else a DatasetError naming `where` (its URL) and
    the field: `shards` (each with `name`, `samples`, `bytes`, `sha256`), `classes`, and, when
    present, `label_histogram` (one count per class), `multi_label` and `num_samples`."""
    fix = "re-shard the dataset with `vitpipe shard` (or re-index it with `vitpipe index`)"

    def bad(field: str, what: str) -> DatasetError:
        return DatasetError(f"{where}: {field} {what}; {fix}")

    if not isinstance(manifest, dict):
        raise bad("the file", "is not a JSON object")
    for field, kind in (("shards", list), ("classes", list)):
        if field not in manifest:
            raise bad(f"field '{field}'", "is missing")
        if not isinstance(manifest[field], kind):
            raise bad(f"field '{field}'", f"is not a {kind.__name__}")
    for i, entry in enumerate(manifest["shards"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise bad(f"shards[{i}]", "has no 'name'")
        label = f"shards[{i}] ({entry['name']})"
        for field in ("samples", "bytes"):
            if field not in entry:
                raise bad(f"{label}", f"has no '{field}'")
            if not isinstance(entry[field], int) or isinstance(entry[field], bool) or entry[field] < 0:
                raise bad(f"{label} '{field}'", f"is {entry[field]!r}, not a count")
        if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
            raise bad(f"{label}", "has no valid 'sha256'")
    histogram = manifest.get("label_histogram")
    if histogram is not None and (not isinstance(histogram, list) or len(histogram) != len(manifest["classes"])):
        raise bad("field 'label_histogram'", f"does not have one count for each of the {len(manifest['classes'])} "
                  "classes")
    if not isinstance(manifest.get("multi_label", False), bool):
        raise bad("field 'multi_label'", "is not true or false")
    total = sum(entry["samples"] for entry in manifest["shards"])
    if manifest.get("num_samples", total) != total:
        raise bad("field 'num_samples'", f"is {manifest['num_samples']!r} but the shards hold {total}")
    return manifest
