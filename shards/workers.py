"""Worker processes for scanning and writing shards on one machine."""
from __future__ import annotations

import gc
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager

from shards import storage


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity: what a Slurm allocation or a cpuset leaves)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def ordered_map(executor, fn, items, *, ahead: int):
    """executor.map(fn, items), keeping at most `ahead` items submitted and not yet yielded.
    (Executor.map submits every item at once: all their arguments and results in memory together,
    gigabytes for the chunks of a 14M-image listing.)"""
    from collections import deque

    pending = deque()
    try:
        for item in items:
            pending.append(executor.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def unordered_map(executor, fn, items, *, ahead: int):
    """(item, fn(item)) as they complete, with at most `ahead` submitted and not yet yielded: when the
    caller stops (an exception, a signal), at most that many more run; `_Pool` cancels the rest."""
    from concurrent.futures import FIRST_COMPLETED, wait

    pending: dict = {}
    try:
        for item in items:
            pending[executor.submit(fn, item)] = item
            while len(pending) >= ahead:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield pending.pop(future), future.result()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield pending.pop(future), future.result()
    finally:
        for future in pending:
            future.cancel()


def _init_worker(settings: dict) -> None:
    # SIGINT/SIGTERM go to the whole process group: the parent decides (no new work), a worker
    # finishes the shard it is writing, so nothing is left half-written
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    storage.configure(**settings)


def _ready() -> None:
    pass


@contextmanager
def gc_frozen():
    """Processes forked inside keep the objects alive now out of their garbage collector.

    Otherwise a forked child's first full collection walks every object inherited from the
    parent, writing to each one's page and so copying it. `gc.freeze()` before fork is what the
    `gc` docs advise; the parent unfreezes right after, so its own collections are unchanged."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class _Pool(ProcessPoolExecutor):
    """Leaving the `with` block on an exception (a signal included) cancels the queued work instead of
    running it all first (ProcessPoolExecutor.__exit__ waits for every submitted item)."""

    def __exit__(self, exc_type, exc, tb):
        self.shutdown(wait=True, cancel_futures=exc_type is not None)
        return False


def process_pool(workers: int) -> ProcessPoolExecutor:
    """`workers` processes, started now (forked: no re-import, the parent's storage settings
    carried over, its heap kept out of their GC)."""
    context = multiprocessing.get_context("fork")
    pool = _Pool(max_workers=workers, mp_context=context, initializer=_init_worker,
                               initargs=(storage.settings_dict(),))
    with gc_frozen():  # a fork pool starts all its processes at the first submit
        pool.submit(_ready).result()
    return pool
