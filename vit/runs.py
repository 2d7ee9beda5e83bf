"""The run folder layout `<root>/runs/<run-id>/` (local path or s3://) and run ids.

A run folder holds `config.json`, `run.json` (status running -> complete|failed, written
with `complete` LAST), `checkpoints/`, `model.safetensors` + `model_config.json`,
`metrics.csv`, `tb/`, `report/`. All I/O goes through `shards.storage`.
"""
from __future__ import annotations

import datetime as _dt
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

from shards import storage

KINDS = ("shard", "pretrain", "finetune", "evaluate", "pipeline")


def new_run_id(kind: str) -> str:
    """`<kind>-YYYYmmdd-HHMMSS-<6 hex>` (UTC)."""
    if kind not in KINDS:
        raise ValueError(f"run kind {kind!r} is not one of {list(KINDS)}")
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{kind}-{now}-{secrets.token_hex(3)}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def code_version() -> str:
    """The git commit of this checkout (with -dirty), else the installed package version, else 'unknown'."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import PackageNotFoundError, version

        return f"vitpipe=={version('vitpipe')}"
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class RunFolder:
    """Names of the files of one run; `RunFolder.create(root, run_id)` = `<root>/runs/<run-id>`."""

    url: str

    @classmethod
    def create(cls, root: str, run_id: str) -> "RunFolder":
        return cls(storage.join(root, "runs", run_id))

    @property
    def run_id(self) -> str:
        return storage.basename(self.url.rstrip("/"))

    def file(self, *parts: str) -> str:
        return storage.join(self.url, *parts)

    @property
    def config(self) -> str:
        return self.file("config.json")

    @property
    def run_json(self) -> str:
        return self.file("run.json")

    @property
    def checkpoints(self) -> str:
        return self.file("checkpoints")

    @property
    def model(self) -> str:
        return self.file("model.safetensors")

    @property
    def model_config(self) -> str:
        return self.file("model_config.json")

    @property
    def metrics(self) -> str:
        return self.file("metrics.csv")

    @property
    def tb(self) -> str:
        return self.file("tb")

    @property
    def report(self) -> str:
        return self.file("report")

    def read_run(self) -> dict | None:
        return storage.read_json(self.run_json) if storage.exists(self.run_json) else None

    def start(self, *, kind: str, parent: str | None = None, lineage: dict | None = None) -> dict:
        """Write run.json with status `running` (keeps `created` of an earlier attempt)."""
        old = self.read_run() or {}
        meta = {
            "run_id": self.run_id,
            "kind": kind,
            "status": "running",
            "created": old.get("created", _now()),
            "finished": None,
            "parent": parent,
            "lineage": {"code_version": code_version(), **(lineage or {})},
            "metrics": {},
        }
        storage.write_json(self.run_json, meta)
        return meta

    def finish(self, *, status: str = "complete", metrics: dict | None = None) -> dict:
        """Mark the run complete (or failed); call after every other artifact is written."""
        if status not in ("complete", "failed"):
            raise ValueError(f"status {status!r} must be 'complete' or 'failed'")
        meta = self.read_run() or {"run_id": self.run_id}
        meta.update(status=status, finished=_now(), metrics={**meta.get("metrics", {}), **(metrics or {})})
        storage.write_json(self.run_json, meta)
        return meta

    def latest_checkpoint(self) -> str | None:
        """Tag of the newest complete DeepSpeed checkpoint (the `latest` file), or None."""
        latest = self.file("checkpoints", "latest")
        if not storage.exists(latest):
            return None
        tag = storage.read_bytes(latest).decode().strip()
        return tag or None
