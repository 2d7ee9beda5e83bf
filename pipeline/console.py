"""The command line's one logging set-up: messages of every module go to stderr through the
logger tree (``vitpipe`` for the CLI's own, ``vit.*`` / ``shards.*`` for the library), at
``--log-level`` (other libraries' loggers: warnings and errors only); ``--quiet`` shows warnings and errors only and turns progress bars off."""
from __future__ import annotations

import logging
import sys

LOG = logging.getLogger("vitpipe")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
PROJECT_LOGGERS = ("vitpipe", "pipeline", "vit", "shards")


def setup_logging(level: str = "INFO", *, quiet: bool = False) -> None:
    """Configure the root logger once, at the entry point (a second call replaces the handler)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_vitpipe", False)]:
        root.removeHandler(handler)
    handler = _Stderr()
    handler._vitpipe = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING)  # other libraries (httpx, DeepSpeed, Prefect): warnings and errors only
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else getattr(logging, level.upper()))


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record (a plain StreamHandler keeps the
    stream it was given, so output redirected after set-up would be lost)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("vitpipe")
    except PackageNotFoundError:  # a source tree that was not installed
        return "unknown (not installed)"
