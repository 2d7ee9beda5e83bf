"""Writing one shard: a deterministic tar (fixed member order, mtime, owner, mode) from a ShardTask.

`write_shard(task)` is the idempotent unit of work: the tar is assembled in a staging file and
published whole (local rename, or an S3 upload that appears only when complete); then a
completion record `_progress/<shard>.json` (task digest, samples, bytes, sha256) is written. A
re-run that finds a record whose digest matches the task and a shard whose sha256 matches the
record keeps that shard and does no work.

Per sample the writer reads the task's columns directly (no per-sample objects) and builds
the small members from text prepared once per task: in pass-through mode what is left per image is
little more than the read, the sha256 and the write.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
from json.encoder import encode_basestring  # what json.dumps(..., ensure_ascii=False) uses for strings

from shards import storage
from shards.imaging import resize_encode
from shards.plan import EXTS, ShardError, ShardPlan, ShardTask

MTIME = 946684800  # 2000-01-01: every member gets the same timestamp, so shards are byte-identical
PROGRESS_DIR = "_progress"


def _ustar_template() -> tuple[bytes, bytes, bytes, int]:
    """The fixed parts of a ustar header (mode 0444, owner 0/0, mtime MTIME, regular file): the
    fields between the name and the size, between the size and the checksum, after the checksum;
    and the byte sum of all fixed fields with the checksum field counted as spaces."""
    header = bytearray(512)
    header[100:108] = b"0000444\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[136:148] = b"%011o\0" % MTIME
    header[148:156] = b"        "
    header[156:157] = b"0"
    header[257:265] = b"ustar\x0000"
    return bytes(header[100:124]), bytes(header[136:148]), bytes(header[156:]), sum(header)


_USTAR_MODE_OWNER, _USTAR_MTIME, _USTAR_TAIL, _USTAR_SUM = _ustar_template()
_ZEROS = bytes(512)


def _ustar(name: bytes, name_sum: int, size: int) -> bytes:
    """The ustar header of an ASCII `name` of at most 100 bytes, `name_sum` being sum(name)."""
    size_field = b"%011o\0" % size
    return b"".join((name.ljust(100, b"\0"), _USTAR_MODE_OWNER, size_field, _USTAR_MTIME,
                     b"%06o\0 " % (_USTAR_SUM + name_sum + sum(size_field)), _USTAR_TAIL))


def tar_header(name: str, size: int) -> bytes:
    """The header block(s) of a regular file member: fixed mode 0444, owner 0/0, mtime MTIME.

    Plain ASCII names up to 100 bytes get a ustar header built here; other names go through
    tarfile's PAX encoder, which is deterministic for the same fields."""
    encoded = name.encode("utf-8")
    if len(encoded) > 100 or not name.isascii():
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, MTIME, 0o444, 0, 0, "", ""
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    return _ustar(encoded, sum(encoded), size)


class _SampleWriter:
    """Turns one sample of a task into tar bytes: `<key>.<ext>` (the image), `<key>.cls`
    (single-label: the class id) and `<key>.json`, which is byte for byte
    json.dumps({"labels", "classes", "path", "width", "height"}, sort_keys=True, ensure_ascii=False):
    its label part is built once per distinct label set, the path goes through json's own string
    encoder. Headers are tar_header's bytes; when all three names fit a ustar header (the usual
    case) the key's byte sum, which the checksum needs, is taken once for the three."""

    def __init__(self, task: ShardTask):
        self._classes, self._multi_label = task.classes, task.multi_label
        self._labels: dict[tuple[int, ...], tuple[str, str, bytes | None]] = {}
        self._suffixes = {s: (b"." + s.encode("ascii"), sum(b"." + s.encode("ascii"))) for s in EXTS + ("cls", "json")}

    def __call__(self, key: str, ext: str, data: bytes, labels: tuple[int, ...], path: str, width: int,
                 height: int) -> tuple[bytes, bytes, bytes]:
        """(image header, image bytes, the rest: padding, the cls and json members) of one sample."""
        pieces = self._labels.get(labels)
        if pieces is None:
            pieces = self._labels[labels] = self._label_pieces(labels)
        head, middle, cls = pieces
        meta = ('%s%d%s%s, "width": %d}' % (head, height, middle, encode_basestring(path), width)).encode("utf-8")
        encoded = key.encode("utf-8")
        suffixes = self._suffixes
        # the key's byte sum (for the ustar checksum) once for its three members; None: some name needs PAX
        key_sum = sum(encoded) if len(encoded) <= 95 and key.isascii() and ext in suffixes else None  # ".json": 5
        parts = []
        for suffix, payload in ((ext, data), ("cls", cls), ("json", meta)):
            if payload is None:  # multi-label: no .cls
                continue
            if key_sum is None:
                header = tar_header(f"{key}.{suffix}", len(payload))
            else:
                name, name_sum = suffixes[suffix]
                header = _ustar(encoded + name, key_sum + name_sum, len(payload))
            parts += (header, payload, _ZEROS[:-len(payload) % 512])
        return parts[0], parts[1], b"".join(parts[2:])

    def _label_pieces(self, labels: tuple[int, ...]) -> tuple[str, str, bytes | None]:
        head = '{"classes": [%s], "height": ' % ", ".join(encode_basestring(self._classes[i]) for i in labels)
        middle = ', "labels": [%s], "path": ' % ", ".join(str(i) for i in labels)
        return head, middle, None if self._multi_label else str(labels[0]).encode("ascii")


def _columns(task: ShardTask):
    """Per sample of the task, in order: (key, path, url, offset, length, nbytes, ext, width, height,
    labels), read straight from the task's columns; offset is -1 for a whole file."""
    records, rows = task.records, task.rows

    def column(values):
        return (values if rows is None else values[rows]).tolist()

    ext, width, height, nbytes = column(task.ext), column(task.width), column(task.height), column(task.nbytes)
    ids = task.class_ids.tolist()
    off = None if task.class_off is None else task.class_off.tolist()
    paths, roots, root_idx, offsets, lengths = records.paths, records.roots, records.root_idx, records.offset, records.length
    for i, r in enumerate(range(len(task)) if rows is None else rows.tolist()):
        path = paths[r]
        offset = offsets[r] if offsets else -1
        yield (records.key(r), path, records._url(roots[root_idx[r]], path, offset), offset,
               lengths[r] if offset >= 0 else -1, nbytes[i], EXTS[ext[i]], width[i], height[i],
               (ids[i],) if off is None else tuple(ids[off[i]:off[i + 1]]))


class _TarOut:
    """Tar bytes gathered as a list of buffers and written with writev, a few MB at a time, also
    fed to the shard's sha256: no per-member write call and no copy of the image bytes."""

    FLUSH = 4 << 20
    _IOV_MAX = 512  # buffers per writev call (Linux takes up to 1024)

    def __init__(self, fd: int):
        self._fd = fd
        self._parts: list[bytes] = []
        self._pending = 0
        self.digest = hashlib.sha256()
        self.bytes = 0

    def add(self, parts) -> None:
        """Append buffers that together make whole 512-byte blocks."""
        self._parts += parts
        self._pending += sum(map(len, parts))
        if self._pending >= self.FLUSH or len(self._parts) >= self._IOV_MAX:
            self.flush()

    def flush(self) -> None:
        update = self.digest.update
        for part in self._parts:
            update(part)
        views = [memoryview(part) for part in self._parts if part]
        while views:  # writev may write less than asked: go on from where it stopped
            written = os.writev(self._fd, views)
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            if views and written:
                views[0] = views[0][written:]
        self.bytes += self._pending
        self._parts, self._pending = [], 0

    def finish(self) -> None:
        self.add((bytes(1024),))  # end-of-archive: two zero blocks
        self.flush()


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


def _write_tar(task: ShardTask, path: str) -> tuple[int, str]:
    sample = _SampleWriter(task)
    with open(path, "wb", buffering=0) as f:
        tar = _TarOut(f.fileno())
        for key, rel_path, url, offset, length, nbytes, ext, width, height, labels in _columns(task):
            try:
                data = storage.read_record(url, offset, length, size=nbytes)
            except (storage.StorageError, OSError) as err:
                raise ShardError(f"{rel_path}: unreadable while writing {task.name} ({err}); fix access and re-run") from None
            # the scan hashed this file; a size check here (not a second hash) catches a file rewritten since
            if len(data) != nbytes:
                raise ShardError(f"{rel_path}: changed since it was scanned ({nbytes} -> {len(data)} bytes); "
                                 "re-run to re-plan")
            if task.resize:
                data, ext, width, height = resize_encode(data, shorter=task.resize, quality=task.quality,
                                                         max_pixels=task.max_pixels)
            tar.add(sample(key, ext, data, labels, rel_path, width, height))
        tar.finish()
    return tar.bytes, tar.digest.hexdigest()


def write_shard(plan_or_task: ShardPlan | ShardTask, index: int | None = None) -> dict:
    """Write (or keep, if already complete) one shard; returns {name, samples, bytes, sha256}."""
    task = plan_or_task.tasks[index] if isinstance(plan_or_task, ShardPlan) else plan_or_task
    done = completed_entry(task)
    if done is not None:
        return done
    local_out = not storage.is_s3(task.url)
    staging_dir = task.out_url if local_out else None
    if local_out:
        os.makedirs(staging_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{task.name}.", suffix=".partial", dir=staging_dir)
    os.close(fd)
    try:
        nbytes, digest = _write_tar(task, tmp)
        entry = {"name": task.name, "samples": len(task), "bytes": nbytes, "sha256": digest}
        if local_out:
            os.chmod(tmp, 0o644)
            os.replace(tmp, task.url)
        else:
            storage.upload_file(tmp, task.url)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    # not fsynced: a record is trusted only if the shard's size and sha256 still match it
    storage.write_json(progress_url(task), {**entry, "task_digest": task.digest}, durable=False)
    return entry
