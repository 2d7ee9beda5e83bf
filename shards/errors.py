"""The one error base of vitpipe: every error a user can cause or fix derives from `VitpipeError`.

`str(err)` is one line: what went wrong, where (the file, URL, key or field), and what to do.
`cli.main` catches `VitpipeError` once and prints that line; nothing classifies an exception by
its class name. It lives in `shards` because every package may import `shards` (arrows go
`pipeline -> vit -> shards`). Each area subclasses it next to its code.
"""
from __future__ import annotations


class VitpipeError(Exception):
    """An error with a one-line, actionable message.

    exit_code: what the CLI exits with: 2 for bad input (the default), 1 for a job that failed.
    transient: True where a retry may succeed (a store that is down, a rank that was killed).
    """

    exit_code: int = 2
    transient: bool = False


class JobFailed(VitpipeError):
    """The input was fine but the work failed (a rank died, a stage failed): exit 1."""

    exit_code = 1
