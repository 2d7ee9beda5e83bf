"""Worker processes for scanning and writing shards on one machine."""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

from shards import storage


def _init_worker(settings: dict) -> None:
    storage.configure(**settings)


def process_pool(workers: int) -> ProcessPoolExecutor:
    """`workers` processes (forked: no re-import, the parent's storage settings carried over)."""
    context = multiprocessing.get_context("fork")
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                               initargs=(storage.settings_dict(),))
