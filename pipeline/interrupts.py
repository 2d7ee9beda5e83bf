"""SIGINT / SIGTERM stop a command promptly: the signal becomes `Interrupted` in the main thread.

`Interrupted` is a BaseException (like KeyboardInterrupt): `except Exception` does not swallow
it, `finally` blocks and context managers run (worker pools cancel queued work, staging files
are removed, the launcher stops the ranks). A stage adds what it kept (`kept`); `cli.main`
prints one line and exits 128 + the signal number (130, 143).
"""
from __future__ import annotations

import contextlib
import signal
import threading


class Interrupted(BaseException):
    def __init__(self, signum: int, kept: str = "") -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.kept = signum, kept

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def line(self, command: str) -> str:
        kept = self.kept or "complete work is kept"
        return (f"vitpipe {command}: stopped by {signal.Signals(self.signum).name}; {kept}; "
                "re-run the same command to resume")


def _raise(signum, frame) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_raise():
    """Within the block, SIGINT and SIGTERM raise Interrupted in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, _raise) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
