"""The stage layer: shard, pretrain, finetune, evaluate, inspect - one function each, called by the
CLI (`pipeline/cmd_*.py`) and by the Prefect flows (`pipeline/flows.py`) alike.

Each stage owns: its input fingerprint and the skip of an equal complete run, resuming an
unfinished one, retrying transient failures, `run.json` (its only writer; the ranks report
through their status files), `inputs.json`, `files.json`, lineage, the timm export of final
weights and the evaluation after fine-tuning. A run is `complete` only when all of them exist,
so a stage started from the CLI, a flow or a deployment leaves the same run folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Callable

from pipeline import registry
from pipeline.interrupts import Interrupted
from pipeline.settings import DatasetParams, EvalParams, TrainParams
from shards import storage
from shards.errors import JobFailed, VitpipeError

INPUTS_JSON = "inputs.json"
log = logging.getLogger("vitpipe")


class StageError(JobFailed):
    """A stage that cannot run or failed; the message names the run and what to do."""


# ----------------------------------------------------------------------------- run folders


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def dataset_lineage(dataset_url: str) -> dict[str, Any]:
    """What a run records about its input dataset: manifest URL + sha256 and source fingerprint."""
    from shards.reader import load_manifest

    manifest = load_manifest(dataset_url)
    manifest_url = storage.join(dataset_url, "manifest.json")
    return {
        "dataset_url": dataset_url,
        "manifest_url": manifest_url,
        "manifest_sha256": storage.sha256_url(manifest_url),
        "source_fingerprint": (manifest.get("source") or {}).get("fingerprint"),
    }


def read_inputs(run_url: str) -> dict | None:
    url = storage.join(run_url, INPUTS_JSON)
    return storage.read_json(url) if storage.exists(url) else None


def find_run(root: str, *, kind: str, fingerprint: str, complete: bool) -> registry.RunInfo | None:
    """Newest run of ``kind`` under ``root`` whose inputs.json has this fingerprint, complete or not."""
    for info in reversed(registry.list_runs(root, kind=kind)):
        if info.complete == complete and (read_inputs(info.url) or {}).get("fingerprint") == fingerprint:
            return info
    return None


def begin_run(folder, *, kind: str, fingerprint: str, parent: str | None, lineage: dict, config: dict,
              inputs: dict | None = None) -> None:
    """inputs.json, config.json, then run.json `running` (keeps `created` of an earlier attempt)."""
    storage.write_json(folder.file(INPUTS_JSON), {"fingerprint": fingerprint, "kind": kind, "parent": parent,
                                                  "lineage": lineage, **(inputs or {})})
    storage.write_json(folder.config, config)
    folder.start(kind=kind, parent=parent, lineage=lineage)


def complete_run(run_url: str, *, metrics: dict | None = None) -> dict:
    """Index the run's files (files.json) and mark it complete, in that order."""
    from vit.runs import RunFolder

    registry.write_file_index(run_url)
    return RunFolder(run_url).finish(status="complete", metrics=metrics)


def fail_run(run_url: str, err: BaseException) -> None:
    from vit.runs import RunFolder

    folder = RunFolder(run_url)
    if storage.exists(folder.run_json):
        meta = folder.finish(status="failed")
        meta["error"] = str(err).splitlines()[0][:500] if str(err) else type(err).__name__
        storage.write_json(folder.run_json, meta)


# ----------------------------------------------------------------------------- shard


def existing_dataset(params: DatasetParams) -> dict | None:
    """The manifest at ``params.url`` if it was made from the same source (fingerprint) with the same settings."""
    from dataclasses import asdict

    from shards import ShardSettings, source_fingerprint

    manifest_url = storage.join(params.url, "manifest.json")
    if not storage.exists(manifest_url):
        return None
    manifest = storage.read_json(manifest_url)
    if params.source is None:
        return manifest
    wanted = json.loads(json.dumps(asdict(ShardSettings(name=params.name, shard_size=params.shard_size, **params.settings))))
    if params.window is not None:
        wanted["window"] = params.window
    if manifest.get("settings") != wanted:
        return None
    if (manifest.get("source") or {}).get("fingerprint") != source_fingerprint(params.source, format=wanted["format"]):
        return None
    return manifest


def dask_address(params: DatasetParams) -> str | None:
    """The Dask scheduler a shard stage runs on: the params', else $VITPIPE_DASK_ADDRESS; None: local processes."""
    return params.dask_address or os.environ.get("VITPIPE_DASK_ADDRESS") or None


def shard_stage(params: DatasetParams, *, map_shards: Callable | None = None, progress: bool = False) -> dict:
    """Shard ``params.source`` into ``params.url`` unless the same dataset is already there.

    ``map_shards(tasks) -> entries`` writes the shards (Prefect ``.map`` in the flow); by default
    a local process pool of ``params.workers``. Each shard is idempotent: a re-run keeps the
    complete ones. Returns the manifest, with ``skipped_stage`` True when nothing was written.
    """
    from shards import shard_dataset
    from shards.workers import usable_cores

    existing = existing_dataset(params)
    if existing is not None:
        return {**existing, "skipped_stage": True}
    if params.source is None:
        raise StageError(f"{params.url}: no manifest.json and no source to shard; set source (a class-folder tree) "
                         "or shard it with `vitpipe shard`")
    from shards.index import looks_like_webdataset
    from shards.sources import SourceError

    if looks_like_webdataset(params.source):
        raise SourceError(f"{params.source} already holds WebDataset shards (samples with .cls/.json); use them as they "
                          f"are with `vitpipe index {params.source}`")
    written: list[dict] = []
    try:
        manifest = shard_dataset(params.source, params.url, name=params.name, shard_size=params.shard_size,
                                 workers=params.workers or usable_cores(), progress=progress, map_shards=map_shards,
                                 on_shard_done=written.append, dask=dask_address(params),
                                 partitions=params.partitions, window=params.window, **params.settings)
    except Interrupted as stop:
        stop.kept = f"kept {len(written)} complete shard(s) in {params.url} (no manifest yet)"
        raise
    return {**manifest, "skipped_stage": False}


# ----------------------------------------------------------------------------- pretrain / finetune


def build_run_config(params: TrainParams, *, dataset_url: str, root: str, run_id: str, init_from: str | None = None,
                     parent: str | None = None, check_only: bool = False):
    """The vit.config.RunConfig of a stage: preset + overrides + where the data and the run live."""
    from pipeline.launcher import make_run_config

    sets = list(params.set) + ([f"model.img_size={params.img_size}"] if params.img_size else [])
    return make_run_config(params.preset, data=dataset_url, out=root, run_id=run_id, nproc=params.nproc_per_node,
                           steps=params.steps, hostfile=params.hostfile, launcher=params.launcher, no_ssh=params.no_ssh,
                           node_rank=params.node_rank, master_addr=params.master_addr, master_port=params.master_port,
                           init_from=init_from, parent=parent, sets=sets, nnodes=params.nnodes, check_only=check_only)


_RUN_SPECIFIC = ("run_url", "run_id", "local_dir")
_PER_LAUNCH = ("log_dir", "master_port", "master_addr", "node_rank")


def train_fingerprint(cfg, *, kind: str, lineage: dict, extra: dict | None = None) -> str:
    """Hash of what decides a training run's result: config (minus where it lives and how it was reached),
    dataset manifest, parent, and for fine-tuning the evaluation data."""
    data = {k: v for k, v in cfg.to_dict().items() if k not in _RUN_SPECIFIC}
    data["launch"] = {k: v for k, v in data["launch"].items() if k not in _PER_LAUNCH}
    return _digest({"kind": kind, "config": data, "manifest_sha256": lineage["manifest_sha256"], "parent": cfg.parent,
                    **(extra or {})})


def _plan_train(params: TrainParams, *, kind: str, root: str, dataset_url: str, run_id: str | None,
                init_from: str | None, parent: str | None, extra: dict) -> dict:
    """skip (complete run with the same inputs), resume (unfinished run with them, or the given run id) or new."""
    from vit.runs import RunFolder, new_run_id

    lineage = dataset_lineage(dataset_url)
    cfg = build_run_config(params, dataset_url=dataset_url, root=root, run_id=run_id or f"{kind}-pending",
                           init_from=init_from, parent=parent)
    fingerprint = train_fingerprint(cfg, kind=kind, lineage=lineage, extra=extra)
    plan = {"fingerprint": fingerprint, "lineage": lineage}
    if run_id is None:
        done = find_run(root, kind=kind, fingerprint=fingerprint, complete=True)
        if done is not None:
            return {**plan, "action": "skip", "run_id": done.run_id, "run_url": done.url, "config": cfg}
        unfinished = find_run(root, kind=kind, fingerprint=fingerprint, complete=False)
        run_id = unfinished.run_id if unfinished else new_run_id(kind)
        cfg = build_run_config(params, dataset_url=dataset_url, root=root, run_id=run_id, init_from=init_from,
                               parent=parent)
    folder = RunFolder.create(root, run_id)
    old = folder.read_run()
    if old and old.get("status") == "complete":
        return {**plan, "action": "skip", "run_id": run_id, "run_url": folder.url, "config": cfg}
    return {**plan, "action": "resume" if old else "new", "run_id": run_id, "run_url": folder.url, "config": cfg}


def train_stage(params: TrainParams, *, kind: str, root: str, dataset_url: str, run_id: str | None = None,
                pretrained: str | None = None, val_data: str | None = None, eval_params: EvalParams = EvalParams(),
                launch_fn: Callable | None = None) -> dict:
    """A whole pretrain / finetune stage: plan (skip/resume/new), launch with retries, then finish
    (fine-tune: evaluate on ``val_data``; every run: the timm export), files.json, complete.

    ``launch_fn(cfg)`` runs the ranks once (default: ``pipeline.launcher.launch``) and returns its
    LaunchResult; a transient failure is retried ``params.retries`` times, each attempt resuming
    from the last checkpoint in the same run folder. Returns {run_id, run_url, skipped, attempts, metrics}.
    """
    from pipeline.cluster import launch_overrides
    from pipeline.launcher import check_dataset, launch
    from vit.runs import RunFolder

    # the cluster shape first: a launch that would be another size than asked is refused before any I/O
    launch_overrides(nnodes=params.nnodes, nproc=params.nproc_per_node, hostfile=params.hostfile, no_ssh=params.no_ssh,
                     node_rank=params.node_rank, master_addr=params.master_addr)
    check_dataset(dataset_url)
    init_from = parent = None
    extra: dict = {}
    if kind == "finetune":
        init_from, parent = _check_finetune_inputs(params, root=root, dataset_url=dataset_url, pretrained=pretrained,
                                                   val_data=val_data)
        extra = {"init_from": init_from, "val_data": val_data, "eval": eval_params.model_dump()}
    plan = _plan_train(params, kind=kind, root=root, dataset_url=dataset_url, run_id=run_id, init_from=init_from,
                       parent=parent, extra=extra)
    folder, cfg = RunFolder(plan["run_url"]), plan["config"]
    if plan["action"] == "skip":
        info = registry.read_run(folder.url)
        return {"run_id": plan["run_id"], "run_url": folder.url, "skipped": True, "attempts": 0, "metrics": info.metrics}
    launch_fn = launch_fn or (lambda c: launch(c, stall_timeout=params.stall_timeout))
    if cfg.launch.node_rank:  # another node of a --no-ssh launch: it runs its ranks; node 0 owns the run folder
        launch_fn(cfg)
        return {"run_id": plan["run_id"], "run_url": folder.url, "skipped": False, "attempts": 1, "metrics": {},
                "node_rank": cfg.launch.node_rank}
    from pipeline.launcher import preflight

    preflight(cfg)  # bad input fails here, before the run folder exists
    begin_run(folder, kind=kind, fingerprint=plan["fingerprint"], parent=parent, lineage=plan["lineage"],
              config=cfg.to_dict())
    attempts = 0
    try:
        while True:
            attempts += 1
            try:
                result = launch_fn(cfg)
                break
            except VitpipeError as err:
                if not err.transient or attempts > params.retries:
                    raise
                log.warning("%s: attempt %d failed (%s); relaunching from the last checkpoint", plan["run_id"],
                            attempts, str(err).splitlines()[0])
        final = getattr(result, "final", None) or {}
        if final.get("event") == "stopped":  # stop_after: a time-boxed launch; the run stays resumable
            return {"run_id": plan["run_id"], "run_url": folder.url, "skipped": False, "attempts": attempts,
                    "metrics": {"steps": final["step"]}, "stopped": True}
        metrics = _finish_training(folder, cfg, final=final, val_data=val_data, eval_params=eval_params)
    except BaseException as err:
        fail_run(folder.url, err)
        if isinstance(err, Interrupted):
            err.kept = f"kept {folder.url} with checkpoints up to {folder.latest_checkpoint() or '(none yet)'}"
        raise
    return {"run_id": plan["run_id"], "run_url": folder.url, "skipped": False, "attempts": attempts, "metrics": metrics}


def _check_finetune_inputs(params: TrainParams, *, root: str, dataset_url: str, pretrained: str | None,
                           val_data: str | None) -> tuple[str, str | None]:
    """The checkpoint to start from and its run id; refuses another architecture or class index before any launch."""
    from pipeline.models import check_architecture, parent_run_id, resolve_source
    from vit.evaluate import check_same_class_index

    if not pretrained:
        raise StageError("finetune needs the pretrained weights: a run id, run folder, latest:pretrain or a weights file")
    if pretrained.startswith("latest:"):
        pretrained = registry.resolve(pretrained, root=root).url
    source = resolve_source(pretrained, runs_root=root)
    if val_data:
        check_same_class_index(dataset_url, val_data)
    cfg = build_run_config(params, dataset_url=dataset_url, root=root, run_id="finetune-check", init_from=source)
    if cfg.task != "finetune":
        from pipeline.models import FinetuneError

        raise FinetuneError(f"preset {params.preset} is a pretraining preset (task={cfg.task}); pick a fine-tune preset (*_ft)")
    check_architecture(source, preset=params.preset, model_name=cfg.model.name, overrides=cfg.model.overrides,
                       img_size=cfg.model.img_size)
    return source, parent_run_id(source)


def _finish_training(folder, cfg, *, final: dict, val_data: str | None, eval_params: EvalParams) -> dict:
    """After the ranks exit 0: evaluation (fine-tune with val_data), the timm export, files.json, complete."""
    from pipeline.models import evaluate
    from vit.evaluate import scalar_metrics
    from vit.export import TIMM_FOLDER

    for path in (folder.model, storage.join(folder.url, TIMM_FOLDER, "config.json")):  # rank 0 writes both last
        if not storage.exists(path):
            raise StageError(f"{folder.url}: the ranks exited but wrote no {path}; see the rank logs")
    metrics = {"steps": final.get("steps", cfg.schedule.total_steps), "final_loss": final.get("final_loss"),
               "corrupt_samples": final.get("corrupt", 0), "img_size": cfg.model.img_size}
    if val_data:
        import os

        result = evaluate(folder.url, val_data, img_size=cfg.model.img_size, nproc=eval_params.nproc,
                          report_dir=folder.report, batch_size=eval_params.batch_size,
                          work_dir=os.path.join(cfg.log_dir, "eval"))
        metrics.update(scalar_metrics(result), val_data=val_data)
    return complete_run(folder.url, metrics=metrics)["metrics"]


# ----------------------------------------------------------------------------- evaluate / inspect


def evaluate_stage(params: EvalParams, *, root: str, model_run: str, dataset_url: str) -> dict:
    """Evaluate the model of run ``model_run`` (URL, run id or latest:finetune) on ``dataset_url`` into a new
    `evaluate` run: metrics.json, the eval report, the HTML run report of the model, files.json. Skipped
    when a complete evaluation of the same model file on the same dataset with the same settings exists."""
    from vit.evaluate import EvalJob, run_eval_job, scalar_metrics
    from vit.runs import RunFolder, new_run_id

    parent = registry.resolve(model_run, root=root)
    if not parent.complete:
        raise StageError(f"{parent.url}: run is {parent.status}, not complete; re-run its stage first")
    lineage = dataset_lineage(dataset_url)
    model_sha = storage.sha256_url(storage.join(parent.url, "model.safetensors"))
    fingerprint = _digest({"kind": "evaluate", "model_sha256": model_sha, "manifest_sha256": lineage["manifest_sha256"],
                           **params.model_dump()})
    done = find_run(root, kind="evaluate", fingerprint=fingerprint, complete=True)
    if done is not None:
        return {"run_id": done.run_id, "run_url": done.url, "skipped": True, "metrics": done.metrics,
                "report": _existing_report(done.url)}
    folder = RunFolder.create(root, new_run_id("evaluate"))
    job = EvalJob(source=parent.url, data=dataset_url, img_size=params.img_size, batch_size=params.batch_size,
                  report_dir=folder.report, result=folder.file("metrics.json"))
    begin_run(folder, kind="evaluate", fingerprint=fingerprint, parent=parent.run_id, lineage=lineage,
              config={"evaluate": params.model_dump(), "job": job.__dict__}, inputs={"model_sha256": model_sha})
    try:
        metrics = scalar_metrics(run_eval_job(job))
        report = inspect_stage(parent.url, out=storage.join(folder.report, "model")) if params.report else None
        complete_run(folder.url, metrics=metrics)
    except BaseException as err:
        fail_run(folder.url, err)
        raise
    return {"run_id": folder.run_id, "run_url": folder.url, "skipped": False, "metrics": metrics,
            "report": report and {"html": report["html"], "pngs": report["pngs"], "markdown": report["markdown"]}}


def _existing_report(run_url: str) -> dict | None:
    html = storage.join(run_url, "report", "model", "report.html")
    if not storage.exists(html):
        return None
    md = storage.join(run_url, "report", "model", "report.md")
    return {"html": html, "pngs": [], "markdown": storage.read_bytes(md).decode() if storage.exists(md) else ""}


def inspect_stage(source: str, *, out: str | None = None, images: str | None = None, compare: str | None = None,
                  num_pcs: int = 28) -> dict:
    """The paper's Fig 6/7 + training curves of a run or checkpoint as PNGs and one report.html."""
    from vit.report import write_report

    return write_report(source, out_dir=out, images=images, compare=compare, num_pcs=num_pcs)
