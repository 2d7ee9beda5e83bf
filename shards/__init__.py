"""shards: image corpora -> WebDataset tar shards + manifest.json, and reading them back.

    from shards import shard_dataset
    manifest = shard_dataset("/data/imagenet21k", "s3://bucket/i21k", name="train", workers=8)

The stage is plan (list, scan, dedup, shuffle, split) -> write_shard per task (idempotent,
parallel) -> finish_dataset (manifest.json written last).
"""
from __future__ import annotations

from shards.manifest import finish_dataset
from shards.plan import ShardError, ShardPlan, ShardSettings, ShardSettingsError, ShardTask, plan_shards
from shards.sources import SourceError, source_fingerprint
from shards.writer import write_shard

__all__ = ["shard_dataset", "plan_shards", "write_shard", "finish_dataset", "source_fingerprint",
           "ShardError", "ShardSettingsError", "SourceError", "ShardPlan", "ShardSettings", "ShardTask"]


def shard_dataset(source, out_url, *, workers: int = 1, progress: bool = False, on_shard_done=None,
                  map_shards=None, dask: str | None = None, partitions: int | None = None, window: int | None = None,
                  **settings) -> dict:
    """Shard `source` into `out_url` (local folder or s3:// prefix); returns the manifest dict.

    `settings` are ShardSettings fields (name, shard_size, max_shard_bytes, resize, quality, seed,
    strict, format, classes, exclude, near_dup_threshold, dedup_within, max_pixels). Re-running
    after a crash keeps complete shards and writes the rest. `on_shard_done(entry)` is called in
    this process after each shard is published. `map_shards(tasks) -> entries` writes the shards
    elsewhere (Prefect tasks); the pool then only plans. On an exception (a signal included) no
    new shard starts: queued writes are cancelled, running ones finish and publish.

    `dask`: a Dask scheduler's address (tcp://host:8786): its workers list, scan and write (they
    need no shared file system when source and destination are on S3); else `workers` local
    processes. `partitions`: how many pieces the source is cut into for listing and scanning
    (default: 4 per worker); the dataset's bytes do not depend on it, nor on the workers.

    `window`: write shards while the rest of the source is still scanned: the source is planned in
    windows of consecutive units (class folders, tars) of at least `window` records each, shuffled
    within the window (shards.windows); `partitions` then cuts each window (default: 2 per worker).
    """
    import time

    from shards import storage

    if workers < 1:
        raise ShardSettingsError(f"workers={workers}: must be >= 1")
    start = time.monotonic()
    try:
        storage.check_writable(out_url)
    except storage.StorageError as err:
        raise ShardError(str(err)) from None
    from contextlib import ExitStack

    from shards import writer
    from shards.workers import usable_cores

    with ExitStack() as stack:
        # writers hash in a thread when there is a core beside each of them (set before the pool forks)
        stack.callback(setattr, writer, "HASH_IN_THREAD", writer.HASH_IN_THREAD)
        writer.HASH_IN_THREAD = workers < usable_cores()
        pool = None
        if dask:
            from shards.workers import DaskPool

            pool = stack.enter_context(DaskPool(dask))
            writer.HASH_IN_THREAD = False
        elif workers > 1:  # one pool for scanning and writing, forked while this process is still small
            from shards.workers import process_pool

            pool = stack.enter_context(process_pool(workers))
        if window is not None:
            from shards.windows import shard_windows

            manifest = shard_windows(source, out_url, window=window, pool=pool, workers=workers, partitions=partitions,
                                     progress=progress, on_shard_done=on_shard_done, map_shards=map_shards, **settings)
        else:
            plan = plan_shards(source, out_url, workers=workers, progress=progress, pool=pool, partitions=partitions,
                               **settings)
            manifest = _write_all(plan, pool, progress=progress, on_shard_done=on_shard_done, map_shards=map_shards)
    from shards.partitions import remove_records

    remove_records(storage.normalize(out_url))  # the dataset is complete: no re-plan needed
    if progress:
        from shards.storage import join

        elapsed = time.monotonic() - start
        print(f"{manifest['num_samples']} samples in {manifest['num_shards']} shards "
              f"({manifest['total_bytes'] / 1e6:.1f} MB, {len(manifest['classes'])} classes) in {elapsed:.1f}s "
              f"({manifest['num_samples'] / max(elapsed, 1e-9):.0f} img/s with "
              f"{f'the Dask cluster at {dask}' if dask else f'{workers} worker' + ('s' if workers > 1 else '')}); "
              f"skipped {len(manifest['skipped'])}"
              + (f" {manifest['dropped']}" if manifest["dropped"] else ""))
        print(f"manifest: {join(storage.normalize(out_url), 'manifest.json')}")
    return manifest


def _write_all(plan: ShardPlan, pool, *, progress: bool, on_shard_done, map_shards=None) -> dict:
    """Write every shard (in `pool` when given), then publish the manifest; returns it."""
    from shards import storage

    storage.remove_stale_staging(plan.out_url)  # left by writers of this dataset that were killed
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=plan.num_samples, desc="write", unit="img", dynamic_ncols=True)
    entries = []

    def done(task, entry):
        entries.append(entry)
        if bar is not None:
            bar.update(len(task))
            bar.set_postfix_str(f"shards {len(entries)}/{len(plan.tasks)}")
        if on_shard_done is not None:
            on_shard_done(entry)

    try:
        if map_shards is not None:
            for task, entry in zip(plan.tasks, map_shards(plan.tasks)):
                done(task, entry)
        elif pool is None or len(plan.tasks) == 1:
            for task in plan.tasks:
                done(task, write_shard(task))
        else:
            from shards.workers import unordered_map

            for task, entry in unordered_map(pool, write_shard, plan.tasks, ahead=2 * pool._max_workers):
                done(task, entry)
    finally:
        if bar is not None:
            bar.close()
    return finish_dataset(plan, entries)
