"""Writing one shard: a deterministic tar (fixed member order, mtime, owner, mode) from a ShardTask.

`write_shard(task)` is the idempotent unit of work: the tar is assembled in a staging file and
published whole (local rename, or an S3 upload that appears only when complete); then a
completion record `_progress/<shard>.json` (task digest, samples, bytes, sha256) is written. A
re-run that finds a record whose digest matches the task and a shard whose sha256 matches the
record keeps that shard and does no work.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile

from shards import storage
from shards.imaging import resize_encode
from shards.plan import ShardError, ShardPlan, ShardTask

MTIME = 946684800  # 2000-01-01: every member gets the same timestamp, so shards are byte-identical
PROGRESS_DIR = "_progress"


def sample_members(task: ShardTask, item, data: bytes) -> list[tuple[str, bytes]]:
    """The tar members of one sample: `<key>.<ext>` image, `<key>.cls` (single-label), `<key>.json`."""
    ext, width, height = item.ext, item.width, item.height
    if task.resize:
        data, ext, width, height = resize_encode(data, shorter=task.resize, quality=task.quality,
                                                 max_pixels=task.max_pixels)
    key = item.ref.key
    meta = {"labels": list(item.label_ids), "classes": [task.classes[i] for i in item.label_ids],
            "path": item.ref.path, "width": width, "height": height}
    members = [(f"{key}.{ext}", data)]
    if not task.multi_label:
        members.append((f"{key}.cls", str(item.label_ids[0]).encode("ascii")))
    members.append((f"{key}.json", json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")))
    return members


def _ustar_template() -> tuple[bytes, bytes, int]:
    """The fixed parts of a ustar header (mode 0444, owner 0/0, mtime MTIME, regular file), split
    around the size field, and their byte sum with the checksum field counted as spaces."""
    header = bytearray(512)
    header[100:108] = b"0000444\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[136:148] = b"%011o\0" % MTIME
    header[148:156] = b"        "
    header[156:157] = b"0"
    header[257:265] = b"ustar\x0000"
    return bytes(header[100:124]), bytes(header[136:148]), sum(header)


_USTAR_MODE_OWNER, _USTAR_MTIME, _USTAR_SUM = _ustar_template()


def tar_header(name: str, size: int) -> bytes:
    """The header block(s) of a regular file member: fixed mode 0444, owner 0/0, mtime MTIME.

    Plain ASCII names up to 100 bytes get a ustar header built here (fast path: the fixed fields'
    checksum is precomputed); other names go through tarfile's PAX encoder, which is deterministic
    for the same fields."""
    encoded = name.encode("utf-8")
    if len(encoded) > 100 or not name.isascii():
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, MTIME, 0o444, 0, 0, "", ""
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    size_field = b"%011o\0" % size
    checksum = b"%06o\0 " % (_USTAR_SUM + sum(encoded) + sum(size_field))
    return b"".join((encoded, bytes(100 - len(encoded)), _USTAR_MODE_OWNER, size_field, _USTAR_MTIME, checksum,
                     b"0", bytes(100), b"ustar\x0000", bytes(247)))


class _TarOut:
    """Tar members gathered as a list of buffers and written with writev, a few MB at a time, also
    fed to the shard's sha256: no per-member write call and no copy of the image bytes."""

    FLUSH = 4 << 20
    _IOV_MAX = 512

    def __init__(self, fd: int):
        self._fd = fd
        self._parts: list[bytes] = []
        self._pending = 0
        self.digest = hashlib.sha256()
        self.bytes = 0

    def add(self, name: str, data: bytes) -> None:
        header = tar_header(name, len(data))
        pad = -len(data) % 512
        self._parts += (header, data, _ZEROS[:pad]) if pad else (header, data)
        self._pending += len(header) + len(data) + pad
        if self._pending >= self.FLUSH or len(self._parts) >= self._IOV_MAX:
            self.flush()

    def flush(self) -> None:
        for part in self._parts:
            self.digest.update(part)
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
        self._parts.append(bytes(1024))  # end-of-archive: two zero blocks
        self._pending += 1024
        self.flush()


_ZEROS = bytes(512)


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
    with open(path, "wb", buffering=0) as f:
        tar = _TarOut(f.fileno())
        for i in range(len(task)):
            item = task.item(i)
            try:
                data = item.ref.read()
            except (storage.StorageError, OSError) as err:
                raise ShardError(f"{item.ref.path}: unreadable while writing {task.name} ({err}); fix access and re-run") from None
            # the scan hashed this file; a size check here (not a second hash) catches a file rewritten since
            if len(data) != item.nbytes:
                raise ShardError(f"{item.ref.path}: changed since it was scanned ({item.nbytes} -> {len(data)} bytes); "
                                 "re-run to re-plan")
            for name, payload in sample_members(task, item, data):
                tar.add(name, payload)
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
