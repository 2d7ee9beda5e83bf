"""The command line's one logging set-up: messages of every module go to stderr through the
logger tree (``vitpipe`` for the CLI's own, ``vit.*`` / ``shards.*`` for the library), at
``--log-level``; ``--quiet`` shows warnings and errors only and turns progress bars off."""
from __future__ import annotations

import logging
import sys

LOG = logging.getLogger("vitpipe")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def setup_logging(level: str = "INFO", *, quiet: bool = False) -> None:
    """Configure the root logger once, at the entry point (a second call replaces the handler)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_vitpipe", False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._vitpipe = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else getattr(logging, level.upper()))


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("vitpipe")
    except PackageNotFoundError:  # a source tree that was not installed
        return "unknown (not installed)"
