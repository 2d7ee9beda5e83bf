"""What the training ranks report to the process that launched them: JSON-lines status records.

Each rank appends to `<log dir>/status-rank<R>.jsonl` (one JSON object per line, flushed):

    {"event": "started", "rank": 0, "world_size": 2, "start_step": 0, "total_steps": 36, "time": ...}
    {"event": "step", "step": 12, "total_steps": 36, "loss": 2.1, "lr": 0.001, "images_per_sec": 41.0,
     "corrupt": 0, "samples": 768, "time": ...}                                         (rank 0 only)
    {"event": "checkpoint", "step": 20, "tag": "step00000020", "time": ...}            (rank 0 only)
    {"event": "finished", "steps": 36, "final_loss": 0.4, "corrupt": 0, "samples": 2304, "time": ...}
    {"event": "stopped", "step": 8, ...}        (stop_after: ended cleanly before the last step)
    {"event": "failed", "error": "one line", "transient": false, "time": ...}
    {"event": "terminated", "signal": 15, "time": ...}   (the launcher stopped this rank)

The launcher reads these, never the ranks' human log text.
"""
from __future__ import annotations

import json
import os
import time


def status_path(log_dir: str, rank: int) -> str:
    return os.path.join(log_dir, f"status-rank{rank}.jsonl")


class StatusWriter:
    """Appends records to one rank's status file (line-buffered; safe to call from a signal handler)."""

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path = path
        self._file = open(path, "a", buffering=1, encoding="utf-8")

    def write(self, event: str, **fields) -> None:
        self._file.write(json.dumps({"event": event, **fields, "time": round(time.time(), 3)}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_status(path: str, *, offset: int | None = None):
    """Every complete record of a status file ([] if there is none yet); a line being written is ignored.

    With `offset` (bytes already read), only the records after it: returns (records, new offset)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset or 0)
            data = fh.read()
    except FileNotFoundError:
        data = b""
    complete = data[: data.rfind(b"\n") + 1]  # a line without its newline is still being written
    records = []
    for line in complete.decode("utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records if offset is None else (records, (offset or 0) + len(complete))


def last(records: list[dict], *events: str) -> dict | None:
    """The newest record whose event is one of `events`."""
    return next((r for r in reversed(records) if r.get("event") in events), None)
