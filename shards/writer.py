"""Writing one shard: a deterministic tar (fixed member order, mtime, owner, mode) from a ShardTask.

`write_shard(task)` is the idempotent unit of work: the tar is assembled in a staging file and
published whole (local rename, or an S3 upload that appears only when complete); then a
completion record `_progress/<shard>.json` (task digest, samples, bytes, sha256) is written. A
re-run that finds a record whose digest matches the task and a shard whose sha256 matches the
record keeps that shard and does no work.

The samples are written a chunk at a time (shards.format.TarWriter.layout): the tar headers and the small
members (`cls`, `json`) of the whole chunk are built with a few array operations, each image is
read straight into its place in the chunk's buffer, and the chunk is hashed and written in one
call each. In pass-through mode what is left per image is the open, the read and its share of
the sha256 and the write.
"""
from __future__ import annotations

import os

from shards import storage
from shards.format import IMAGE_EXTS, SampleMetadata, TarWriter
from shards.imaging import resize_encode
from shards.plan import ShardError, ShardPlan, ShardTask

PROGRESS_DIR = "_progress"


# Hash each chunk in a thread, beside the reads of the next one: worth it only with a CPU core to
# spare (pass-through, 2 cores: one writer process +22%, two writer processes -7%). shard_dataset
# sets it for its run; a write_shard called on its own (e.g. by an orchestrator) hashes inline.
HASH_IN_THREAD = False


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
        yield (paths, locations, records.keys_of(chunk, paths), [IMAGE_EXTS[e] for e in exts[lo:hi]], nbytes[lo:hi],
               widths[lo:hi], heights[lo:hi], labels)
        lo = hi


def _changed(path: str, before: int, now: int) -> ShardError:
    # the scan read this record; a size check here (not a second hash) catches a file rewritten since
    return ShardError(f"{path}: changed since it was scanned ({before} -> {now} bytes); re-run to re-plan")


def _unreadable(path: str, task: ShardTask, err: Exception) -> ShardError:
    return ShardError(f"{path}: unreadable while writing {task.name} ({err}); fix access and re-run")


def _resized(task: ShardTask, paths, locations, nbytes) -> list[tuple[bytes, str, int, int]]:
    """(bytes, ext, width, height) of each image of a chunk, read and resized."""
    def read(item):
        path, (url, offset, length), size = item
        try:
            data = storage.read_record(url, offset, length, size=size)
        except (storage.StorageError, OSError) as err:
            raise _unreadable(path, task, err) from None
        if len(data) != size:
            raise _changed(path, size, len(data))
        return data

    images = storage.map_reads(read, list(zip(paths, locations, nbytes)), locations[0][0] if locations else "")
    return [resize_encode(data, shorter=task.resize, quality=task.quality, max_pixels=task.max_pixels) for data in images]


def _read_images(task: ShardTask, chunk, where: list[int], nbytes: list[int], locations, paths) -> None:
    """Read each image i of a chunk straight into chunk[where[i]:where[i] + nbytes[i]] (from S3, a
    few at a time: storage.map_reads)."""
    def read(item):
        (url, offset, length), start, size, path = item
        try:
            got = storage.read_record_into(url, offset, length, chunk[start:start + size])
        except (storage.StorageError, OSError) as err:
            raise _unreadable(path, task, err) from None
        if got != size:
            raise _changed(path, size, got)

    storage.map_reads(read, list(zip(locations, where, nbytes, paths)), locations[0][0] if locations else "")


def _write_tar(task: ShardTask, fd: int) -> tuple[int, str]:
    """Write the shard's tar to `fd` (an empty file, closed on return)."""
    with os.fdopen(fd, "wb", buffering=0) as f, TarWriter(f.fileno(), hash_in_thread=HASH_IN_THREAD) as tar:
        metadata = SampleMetadata(task.classes, task.multi_label)
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
    task = task.loaded()  # a planned task reads its records from the partitions' route files
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
