"""Writing one shard: a deterministic tar (fixed member order, mtime, owner, mode) from a ShardTask.

`write_shard(task)` is the idempotent unit of work: the tar is assembled in a staging file and
published whole (local rename, or an S3 upload that appears only when complete); then a
completion record `_progress/<shard>.json` (task digest, samples, bytes, sha256) is written. A
re-run that finds a record whose digest matches the task and a shard whose sha256 matches the
record keeps that shard and does no work.

The samples are written a chunk at a time (_TarOut.layout): the tar headers and the small
members (`cls`, `json`) of the whole chunk are built with a few array operations, each image is
read straight into its place in the chunk's buffer, and the chunk is hashed and written in one
call each. In pass-through mode what is left per image is the open, the read and its share of
the sha256 and the write.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from json.encoder import encode_basestring  # what json.dumps(..., ensure_ascii=False) uses for strings

import numpy as np

from shards import storage
from shards.imaging import resize_encode
from shards.plan import EXTS, ShardError, ShardPlan, ShardTask

MTIME = 946684800  # 2000-01-01: every member gets the same timestamp, so shards are byte-identical
PROGRESS_DIR = "_progress"


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


class _Metadata:
    """The small members of each sample: `cls` (single-label: the class id) and `json`, which is byte
    for byte json.dumps({"labels", "classes", "path", "width", "height"}, sort_keys=True,
    ensure_ascii=False); its label part is built once per distinct label set, the path goes through
    json's own string encoder."""

    def __init__(self, task: ShardTask):
        self._classes, self._multi_label = task.classes, task.multi_label
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


# Hash each chunk in a thread, beside the reads of the next one: worth it only with a CPU core to
# spare (pass-through, 2 cores: one writer process +22%, two writer processes -7%). shard_dataset
# sets it for its run; a write_shard called on its own (e.g. by an orchestrator) hashes inline.
HASH_IN_THREAD = False


class _TarOut:
    """The shard's tar file, written a chunk of samples at a time. Each chunk is laid out in one
    buffer of 512-byte blocks: the headers and small members of all its samples are placed in a few
    array operations, each image is read (or copied) straight into its place; the buffer is then
    written with one call and fed to the shard's sha256. With HASH_IN_THREAD that runs in a thread
    (hashlib lets go of the GIL) while the next chunk is laid out and read into the other of two
    buffers. Use as a context manager (the thread ends with it)."""

    def __init__(self, fd: int):
        self._fd = fd
        self._buffers = [np.empty(0, dtype=np.uint8), np.empty(0, dtype=np.uint8)]
        self._turn = 0
        self._digest = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="shard-sha256") if HASH_IN_THREAD else None
        self._hashing = None  # the hash of the last chunk written, while it runs
        self.bytes = 0

    def __enter__(self) -> "_TarOut":
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


_CHUNK_SAMPLES = 64
_CHUNK_BYTES = 1 << 20


def _chunks(task: ShardTask):
    """The task's samples in chunks of up to _CHUNK_SAMPLES or about _CHUNK_BYTES of images, each chunk
    as columns: (paths, locations (url, offset, length), keys, exts, nbytes, widths, heights, labels)."""
    records, rows = task.records, task.rows
    row_list = list(range(len(task))) if rows is None else rows.tolist()

    def column(values):
        return (values if rows is None else values[rows]).tolist()

    exts, widths, heights, nbytes = column(task.ext), column(task.width), column(task.height), column(task.nbytes)
    ids = task.class_ids.tolist()
    off = None if task.class_off is None else task.class_off.tolist()
    lo = 0
    while lo < len(row_list):
        hi, size = lo, 0
        while hi < len(row_list) and hi - lo < _CHUNK_SAMPLES and (size < _CHUNK_BYTES or hi == lo):
            size += nbytes[hi]
            hi += 1
        chunk = range(lo, hi) if rows is None else row_list[lo:hi]
        paths = records.paths_of(chunk)
        locations = records.locations(chunk, paths)
        labels = ([(i,) for i in ids[lo:hi]] if off is None else [tuple(ids[off[i]:off[i + 1]]) for i in range(lo, hi)])
        yield (paths, locations, records.keys_of(chunk, paths), [EXTS[e] for e in exts[lo:hi]], nbytes[lo:hi],
               widths[lo:hi], heights[lo:hi], labels)
        lo = hi


def _changed(path: str, before: int, now: int) -> ShardError:
    # the scan read this record; a size check here (not a second hash) catches a file rewritten since
    return ShardError(f"{path}: changed since it was scanned ({before} -> {now} bytes); re-run to re-plan")


def _unreadable(path: str, task: ShardTask, err: Exception) -> ShardError:
    return ShardError(f"{path}: unreadable while writing {task.name} ({err}); fix access and re-run")


def _resized(task: ShardTask, paths, locations, nbytes) -> list[tuple[bytes, str, int, int]]:
    """(bytes, ext, width, height) of each image of a chunk, read and resized."""
    out = []
    for path, (url, offset, length), size in zip(paths, locations, nbytes):
        try:
            data = storage.read_record(url, offset, length, size=size)
        except (storage.StorageError, OSError) as err:
            raise _unreadable(path, task, err) from None
        if len(data) != size:
            raise _changed(path, size, len(data))
        out.append(resize_encode(data, shorter=task.resize, quality=task.quality, max_pixels=task.max_pixels))
    return out


def _read_images(task: ShardTask, chunk, where: list[int], nbytes: list[int], locations, paths) -> None:
    """Read each image i of a chunk straight into chunk[where[i]:where[i] + nbytes[i]]."""
    for (url, offset, length), start, size, path in zip(locations, where, nbytes, paths):
        try:
            got = storage.read_record_into(url, offset, length, chunk[start:start + size])
        except (storage.StorageError, OSError) as err:
            raise _unreadable(path, task, err) from None
        if got != size:
            raise _changed(path, size, got)


def _write_tar(task: ShardTask, fd: int) -> tuple[int, str]:
    """Write the shard's tar to `fd` (an empty file, closed on return)."""
    with os.fdopen(fd, "wb", buffering=0) as f, _TarOut(f.fileno()) as tar:
        metadata = _Metadata(task)
        for paths, locations, keys, exts, nbytes, widths, heights, labels in _chunks(task):
            images = _resized(task, paths, locations, nbytes) if task.resize else None
            if images is not None:
                exts, widths, heights = ([image[c] for image in images] for c in (1, 2, 3))
                nbytes = [len(image[0]) for image in images]
            small = [metadata(*sample) for sample in zip(labels, paths, widths, heights)]
            chunk, where = tar.layout(keys, exts, nbytes, small)
            if images is not None:
                for (start, size), image in zip(zip(where, nbytes), images):
                    chunk[start:start + size] = image[0]
            else:
                _read_images(task, chunk, where, nbytes, locations, paths)
            tar.write(chunk)
        digest = tar.finish()
    return tar.bytes, digest


def progress_url(task: ShardTask) -> str:
    return storage.join(task.out_url, PROGRESS_DIR, task.name.rsplit(".", 1)[0] + ".json")


def completed_entry(task: ShardTask) -> dict | None:
    """The completion record if this shard is already written correctly, else None."""
    record_url = progress_url(task)
    if not storage.exists(record_url):
        return None
    try:
        record = storage.read_json(record_url)
    except (storage.StorageError, ValueError):  # e.g. cut short by a power loss (records are not fsynced): redo the shard
        return None
    if not isinstance(record, dict) or record.get("task_digest") != task.digest or not storage.exists(task.url):
        return None
    if storage.size(task.url) != record.get("bytes") or storage.sha256_url(task.url) != record.get("sha256"):
        return None
    return {k: record[k] for k in ("name", "samples", "bytes", "sha256")}


def write_shard(plan_or_task: ShardPlan | ShardTask, index: int | None = None) -> dict:
    """Write (or keep, if already complete) one shard; returns {name, samples, bytes, sha256}."""
    task = plan_or_task.tasks[index] if isinstance(plan_or_task, ShardPlan) else plan_or_task
    done = completed_entry(task)
    if done is not None:
        return done
    storage.remove_stale_staging(task.out_url, task.name)  # what a writer of this shard left when it was killed
    # the staging file is written through the descriptor mkstemp opened: reopening it with O_TRUNC would
    # make ext4 (auto_da_alloc) write the whole shard out to disk when it is closed, in this process
    with storage.staged(task.url) as staging:
        nbytes, digest = _write_tar(task, staging.fd)
        staging.publish()
    entry = {"name": task.name, "samples": len(task), "bytes": nbytes, "sha256": digest}
    # not fsynced: a record is trusted only if the shard's size and sha256 still match it
    storage.write_json(progress_url(task), {**entry, "task_digest": task.digest}, durable=False)
    return entry
