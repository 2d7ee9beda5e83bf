"""The dataset manifest: written last; a dataset without `manifest.json` does not exist."""
from __future__ import annotations

import datetime as dt

from shards import storage
from shards.describe import write_reader_info
from shards.format import FORMAT, FORMAT_VERSION, IMAGE_EXTS, MANIFEST
from shards.plan import ShardError, ShardPlan


def build_manifest(plan: ShardPlan, entries: list[dict]) -> dict:
    by_name = {entry["name"]: entry for entry in entries}
    shards = []
    for task in plan.tasks:
        entry = by_name.get(task.name)
        if entry is None:
            raise ShardError(f"{task.url}: shard was not written; re-run to finish the dataset")
        if entry["samples"] != len(task):
            raise ShardError(f"{task.url}: holds {entry['samples']} samples, plan says {len(task)}; re-run")
        shards.append({"name": task.name, "samples": entry["samples"], "bytes": entry["bytes"], "sha256": entry["sha256"]})
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "name": plan.name,
        "shards": shards,
        "num_shards": len(shards),
        "num_samples": sum(s["samples"] for s in shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "classes": plan.classes,
        "num_classes": len(plan.classes),
        "label_histogram": plan.label_histogram,
        "multi_label": plan.multi_label,
        "source": plan.source,
        "fingerprint": plan.fingerprint,
        "settings": plan.settings,
        "skipped": plan.skipped,
        "dropped": plan.dropped,
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def image_extensions(plan: ShardPlan) -> list[str]:
    """The image members' extensions the shards can hold: the sources' own (pass-through); re-encoding
    keeps jpg/png/webp and turns the rest into jpg, or png when transparent (shards.imaging.resize_encode)."""
    exts = {IMAGE_EXTS[c] for c in plan.ext_codes}
    if plan.settings.get("resize") and exts - {"jpg", "png", "webp"}:
        exts |= {"jpg", "png"}
    return sorted(exts)


def finish_dataset(plan: ShardPlan, entries: list[dict]) -> dict:
    """Check every shard is there, then publish manifest.json (the last write). Returns the manifest."""
    manifest = build_manifest(plan, entries)
    write_reader_info(plan.out_url, manifest, image_exts=image_extensions(plan))
    storage.write_json(storage.join(plan.out_url, MANIFEST), manifest)
    return manifest
