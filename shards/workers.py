"""Worker processes for scanning and writing shards on one machine."""
from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import threading
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


def forget_parent_thread_exits(worker_id: int | None = None) -> None:
    """In a forked worker (a shard pool's; a DataLoader's: its worker_init_fn, hence `worker_id`): drop
    the callbacks the parent registered to run when its threads shut down (``threading._register_atexit``),
    which multiprocessing runs at the worker's exit. The worker has none of those threads. Prefect's log
    and event services register one each in a process that ran a flow; in a fork their state is reset,
    the callback fails, and the worker exits with code 1 (a DataLoader's rank reports "DataLoader worker
    (pid N) exited unexpectedly" while shutting it down). concurrent.futures' own callbacks stay: they
    stop executors the worker itself may start."""
    callbacks = getattr(threading, "_threading_atexits", None)
    if callbacks:
        callbacks[:] = [c for c in callbacks
                        if getattr(getattr(c, "func", c), "__module__", "").startswith("concurrent.futures")]


def _init_worker(settings: dict) -> None:
    forget_parent_thread_exits()  # a pool forked in a process that ran a Prefect flow (the shard_dataset flow)
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


class DaskPool:
    """A Dask cluster as the executor the planner and the writers use (submit -> a concurrent.futures
    Future; `_max_workers`: its worker threads). Each call first applies this process's storage
    settings (the S3 endpoint) in the worker; a worker lost mid-task has its task run again by the
    scheduler, and tasks are idempotent (a partition's scan record, a shard's completion record)."""

    def __init__(self, address: str):
        from distributed import Client

        try:
            self.client = Client(address, timeout="20s", set_as_default=False)
        except (OSError, TimeoutError) as err:
            from shards.errors import VitpipeError

            raise VitpipeError(f"--dask {address}: no Dask scheduler answers there ({type(err).__name__}); start "
                               "`dask scheduler` and workers, or leave --dask/VITPIPE_DASK_ADDRESS unset for local "
                               "processes") from None
        self._max_workers = max(1, sum(self.client.nthreads().values()))
        self._settings = storage.settings_dict()

    def submit(self, fn, *args):
        return _DaskFuture(self.client.submit(_configured, self._settings, fn, *args, pure=False))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.client.close()
        return False


class _DaskFuture:
    """A concurrent.futures.Future that follows a Dask future (and cancels it when cancelled)."""

    def __new__(cls, remote):
        from concurrent.futures import Future

        local = Future()
        local.remote = remote  # kept: a Dask future nobody holds is forgotten by the scheduler
        local.set_running_or_notify_cancel()

        def done(fut):
            try:
                local.set_result(fut.result())
            except BaseException as err:  # noqa: BLE001 - handed to whoever waits on it
                if not local.done():
                    local.set_exception(err)

        remote.add_done_callback(done)
        cancel = local.cancel
        local.cancel = lambda: (remote.cancel(), cancel())[1]
        return local


_applied: list = [None]  # the storage settings this worker process last applied (configure drops its S3 clients)


def _configured(settings: dict, fn, *args):
    if settings != _applied[0]:
        storage.configure(**settings)
        _applied[0] = settings
    return fn(*args)


class LoopbackCluster:
    """A real `dask scheduler` and `workers` `dask worker` processes (one thread each, no nanny: a
    killed worker stays dead) on 127.0.0.1 with free ports, for tests and benchmarks; stopped on exit.
    `env`: the workers' environment (the S3 endpoint and credentials); `log_dir`: where their logs
    stay, else a temporary folder removed on exit."""

    def __init__(self, workers: int, *, env: dict | None = None, log_dir: str | None = None):
        self.n, self.env, self.log_dir = workers, dict(env or os.environ), log_dir
        self.procs: list = []
        self.address, self._temp = "", None

    def __enter__(self):
        import subprocess
        import sys
        import tempfile

        from pipeline.objectstore import free_port

        dask = os.path.join(os.path.dirname(sys.executable), "dask")
        self.address = f"tcp://127.0.0.1:{free_port()}"
        if self.log_dir is None:
            self._temp = tempfile.mkdtemp(prefix="vitpipe-dask-")
        logs = self.log_dir or self._temp
        common = {"env": self.env, "stdin": subprocess.DEVNULL, "start_new_session": True}
        try:
            with open(os.path.join(logs, "scheduler.log"), "wb") as log:
                self.procs.append(subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port",
                                                    self.address.rsplit(":", 1)[1], "--no-dashboard"],
                                                   stdout=log, stderr=subprocess.STDOUT, **common))
            for i in range(self.n):
                self.add_worker(logs, dask, common, i)
            self.wait_for(self.n)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def add_worker(self, logs, dask, common, i):
        import subprocess

        with open(os.path.join(logs, f"worker{i}.log"), "wb") as log:
            self.procs.append(subprocess.Popen([dask, "worker", self.address, "--nthreads", "1", "--no-nanny",
                                                "--no-dashboard", "--memory-limit", "0", "--host", "127.0.0.1",
                                                "--name", f"w{i}"], stdout=log, stderr=subprocess.STDOUT, **common))

    @property
    def workers(self) -> list:
        """The worker processes (Popen), in start order."""
        return self.procs[1:]

    def wait_for(self, n: int, timeout: float = 60.0) -> None:
        from distributed import Client

        with Client(self.address, timeout=f"{timeout}s", set_as_default=False) as client:
            client.wait_for_workers(n, timeout=timeout)

    def __exit__(self, *exc):
        import subprocess

        for proc in reversed(self.procs):  # workers first (they hold no state worth a graceful close)
            if proc.poll() is None:
                proc.kill() if proc is not self.procs[0] else proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._temp is not None:  # made for this cluster: its logs go with it
            import shutil

            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None
        return False
