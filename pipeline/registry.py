"""The artifact registry: runs stored under ``<root>/runs/<run-id>/`` (local or s3://).

A run folder holds ``run.json`` (kind, status, parent, lineage, metrics; schema in
docs/interfaces.md) and, once complete, ``files.json``: the sha256 and size of every file in
the folder, so ``get_run`` can check what it downloads. ``latest(root, kind)`` never returns
a run that is not complete.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from shards import storage
from shards.errors import VitpipeError

FILE_INDEX = "files.json"
RUN_JSON = "run.json"
STATUSES = ("running", "complete", "failed")


class RegistryError(VitpipeError):
    """A run reference that cannot be resolved, or a download that does not check out."""


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    url: str
    kind: str
    status: str
    created: str
    finished: str | None
    parent: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def key_metric(self) -> tuple[str, Any] | None:
        """The metric a listing shows: top1 if present, else the first recorded one."""
        for name in ("top1", "val_top1", "eval_top1", "loss", "train_loss"):
            if name in self.metrics:
                return name, self.metrics[name]
        if self.metrics:
            name = sorted(self.metrics)[0]
            return name, self.metrics[name]
        return None


def runs_url(root: str) -> str:
    return storage.join(root, "runs")


def run_url(root: str, run_id: str) -> str:
    return storage.join(runs_url(root), run_id)


def read_run(url: str) -> RunInfo:
    """Read ``run.json`` of the run folder ``url``."""
    meta_url = storage.join(url, RUN_JSON)
    if not storage.exists(meta_url):
        raise RegistryError(f"{url}: no {RUN_JSON}; not a run folder (runs live under <root>/runs/<run-id>/)")
    meta = storage.read_json(meta_url)
    return RunInfo(
        run_id=meta.get("run_id") or url.rstrip("/").rsplit("/", 1)[-1],
        url=url,
        kind=meta.get("kind", "?"),
        status=meta.get("status", "running"),
        created=meta.get("created") or "",
        finished=meta.get("finished"),
        parent=meta.get("parent"),
        metrics=dict(meta.get("metrics") or {}),
        lineage=dict(meta.get("lineage") or {}),
    )


def list_runs(root: str, *, kind: str | None = None) -> list[RunInfo]:
    """All runs under ``root`` (oldest first); folders without a readable run.json are ignored."""
    base = runs_url(root)
    try:
        names = storage.listdir(base)
    except storage.StorageNotFound:
        return []
    runs = []
    for name in names:
        name = name.rstrip("/")
        url = storage.join(base, name)
        if not storage.exists(storage.join(url, RUN_JSON)):
            continue
        info = read_run(url)
        if kind is None or info.kind == kind:
            runs.append(info)
    runs.sort(key=_age_key)
    return runs


def _age_key(info: RunInfo) -> tuple[str, str, str]:
    """Oldest first: `created`, then the UTC stamp inside the run id (`<kind>-YYYYmmdd-HHMMSS-<hex>`)."""
    parts = info.run_id.rsplit("-", 3)
    stamp = "-".join(parts[1:3]) if len(parts) == 4 else ""
    return info.created, stamp, info.run_id


def latest(root: str, kind: str) -> RunInfo:
    """The newest complete run of ``kind`` under ``root``."""
    done = [r for r in list_runs(root, kind=kind) if r.complete]
    if not done:
        raise RegistryError(f"no complete {kind} run under {runs_url(root)}; run `vitpipe {kind if kind != 'pipeline' else 'run'}` first")
    return done[-1]


def resolve(ref: str, *, root: str | None = None) -> RunInfo:
    """A run URL / path, a run id (needs ``root``), or ``latest:<kind>`` (needs ``root``)."""
    if ref.startswith("latest:"):
        if root is None:
            raise RegistryError(f"{ref}: `latest:` needs --root (the storage root holding runs/)")
        return latest(root, ref.split(":", 1)[1])
    if storage.is_s3(ref) or os.sep in ref or "/" in ref:
        return read_run(ref.rstrip("/"))
    if root is None:
        raise RegistryError(f"{ref}: a bare run id needs --root (the storage root holding runs/)")
    return read_run(run_url(root, ref))


def _relative(base: str, url: str) -> str:
    base = base.rstrip("/") + "/"
    if not url.startswith(base):
        raise RegistryError(f"{url} is not under {base}")
    return url[len(base):]


def write_file_index(url: str) -> dict[str, dict[str, Any]]:
    """Write ``files.json`` ({relative path: {sha256, bytes}}) for every file in the run folder.

    ``run.json`` and ``files.json`` themselves are not indexed (run.json changes at completion).
    """
    index = {}
    for file_url in sorted(storage.list_recursive(url)):
        rel = _relative(url, file_url)
        if rel in (RUN_JSON, FILE_INDEX):
            continue
        index[rel] = {"sha256": storage.sha256_url(file_url), "bytes": storage.size(file_url)}
    storage.write_json(storage.join(url, FILE_INDEX), index)
    return index


def read_file_index(url: str) -> dict[str, dict[str, Any]]:
    index_url = storage.join(url, FILE_INDEX)
    if not storage.exists(index_url):
        raise RegistryError(f"{url}: no {FILE_INDEX}; the run never completed, so its files cannot be checked")
    return storage.read_json(index_url)


def get_run(ref: str, dest: str, *, root: str | None = None, file: str | None = None,
            progress: bool = False) -> list[str]:
    """Download a run (or one named file of it) to the local folder ``dest``; check every sha256.

    Returns the local paths written. A file whose checksum does not match is deleted and
    raises RegistryError. ``progress``: a bar of bytes on stderr.
    """
    import hashlib

    info = resolve(ref, root=root)
    index = read_file_index(info.url)
    if file is not None:
        if file not in index:
            names = ", ".join(sorted(index)[:12])
            raise RegistryError(f"{info.run_id}: no file {file!r} in the run (files: {names})")
        wanted = {file: index[file]}
    else:
        wanted = index
    out = []
    os.makedirs(dest, exist_ok=True)
    bar = None
    if progress:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=sum(e["bytes"] for e in wanted.values()), desc=f"get {info.run_id}", unit="B",
                   unit_scale=True, dynamic_ncols=True, file=sys.stderr)
    for rel, entry in sorted(wanted.items()):
        local = os.path.join(dest, *rel.split("/"))
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        storage.download_file(storage.join(info.url, rel), local)
        digest = hashlib.sha256()
        with open(local, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != entry["sha256"]:
            os.remove(local)
            raise RegistryError(f"{info.run_id}/{rel}: sha256 mismatch (stored file changed or corrupt); re-run the stage")
        out.append(local)
        if bar is not None:
            bar.update(entry["bytes"])
    if bar is not None:
        bar.close()
    if file is None:
        storage.write_json(os.path.join(dest, RUN_JSON), storage.read_json(storage.join(info.url, RUN_JSON)))
        out.append(os.path.join(dest, RUN_JSON))
    return out
