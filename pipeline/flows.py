"""Prefect flows: one per stage (`shard_dataset`, `pretrain`, `finetune`, `evaluate`) and
`vit_pipeline` chaining them.

Flows are thin. The work lives in ``shards.*`` (sharding), ``pipeline.launcher`` (DeepSpeed
ranks) and ``vit.*`` (evaluation, reports); each stage is also a plain function
(``shard_stage``, ``train_stage``, ``evaluate_stage``) that tests call without Prefect.

Re-running is cheap: a dataset whose manifest records the same source fingerprint and
settings is not re-sharded, and a training stage whose inputs (config, dataset manifest
sha256, parent run) hash to the fingerprint of a complete run is skipped; an unfinished run
with the same inputs is resumed from its last checkpoint instead of starting over.
Every stage run folder gets ``inputs.json`` (the fingerprint and what it was computed from)
when it starts and ``files.json`` (sha256 of every file) before it is marked complete.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Any, Literal

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, ConfigDict, Field

from pipeline import registry
from shards import storage
from shards.errors import JobFailed, VitpipeError

INPUTS_JSON = "inputs.json"


# ----------------------------------------------------------------------------- parameters


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetParams(_Params):
    """One dataset: shard ``source`` into ``url`` (or, with no source, use the shards already at ``url``)."""

    url: str = Field(description="where the shards and manifest.json go (local folder or s3://bucket/prefix)")
    source: str | None = Field(None, description="class-folder tree, tar-of-tars or JFT-style manifest; None: url is already sharded")
    name: str = Field("data", description="shard file prefix: <name>-000000.tar")
    shard_size: int = Field(1000, gt=0, description="samples per shard")
    settings: dict[str, Any] = Field(default_factory=dict, description="further keyword settings of shards.shard_dataset")


class TrainParams(_Params):
    """A training stage: a preset from vit.presets plus overrides, and how to launch it."""

    preset: str = Field(description="run preset name in vit.presets (e.g. digits_tiny)")
    set: list[str] = Field(default_factory=list, description="config overrides key=value, e.g. schedule.total_steps=50")
    steps: int | None = Field(None, ge=1, description="total optimizer steps (None: the preset's)")
    nproc_per_node: int = Field(1, ge=1, description="ranks per node")
    hostfile: str | None = Field(None, description="DeepSpeed hostfile ('HOST slots=N' lines) for multi-node runs")
    launcher: Literal["pdsh", "openmpi", "mvapich", "slurm", "impi"] | None = Field(None, description="multi-node launcher (default pdsh)")
    stall_timeout: float = Field(600.0, gt=0, description="seconds without a new training step before the ranks are killed and retried")
    retries: int = Field(2, ge=0, description="relaunches after a failed or stalled launch (each resumes from the last checkpoint)")


class EvalParams(_Params):
    batch_size: int = Field(64, ge=1)
    img_size: int | None = Field(None, description="None: the fine-tuned checkpoint's resolution")
    report: bool = Field(True, description="draw the HTML run report (figures, curves)")


class TaskRunnerParams(_Params):
    """Where mapped tasks (one per shard) run: a local Dask cluster of processes, a Dask cluster's address, or threads."""

    kind: Literal["dask", "threads"] = "dask"
    address: str | None = Field(None, description="tcp://scheduler:8786 of a running Dask cluster; None: start a local one")
    workers: int = Field(2, ge=1, description="local cluster: worker processes (threads: pool size)")


class PipelineConfig(_Params):
    """The whole chain; `vitpipe run CONFIG.yaml` reads this (unknown keys are rejected)."""

    root: str = Field(description="storage root holding runs/ (local folder or s3://bucket/prefix)")
    s3_endpoint: str | None = Field(None, description="S3 endpoint URL (default: $AWS_ENDPOINT_URL, else AWS)")
    pretrain_data: DatasetParams
    finetune_data: DatasetParams
    eval_data: DatasetParams
    pretrain: TrainParams
    finetune: TrainParams
    evaluate: EvalParams = Field(default_factory=EvalParams)
    task_runner: TaskRunnerParams = Field(default_factory=TaskRunnerParams)


def load_pipeline_config(path: str) -> PipelineConfig:
    """Read and validate a YAML pipeline config; errors name the key and the file."""
    import yaml
    from pydantic import ValidationError

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as err:
        raise ConfigFileError(f"{path}: cannot read it ({err.strerror}); pass an existing pipeline YAML") from None
    except yaml.YAMLError as err:
        raise ConfigFileError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: expected a mapping of pipeline settings at the top level (see deploy/pipeline.example.yaml)")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        problems = ["{}: {}".format(".".join(str(p) for p in e["loc"]), e["msg"]) for e in err.errors()]
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ConfigFileError(f"{path}: {'; '.join(problems[:5])}{more}; see deploy/pipeline.example.yaml") from None


class ConfigFileError(VitpipeError, ValueError):
    """A pipeline config file that cannot be used (names the file and key)."""


class StageError(JobFailed):
    """A stage that cannot run or failed; the message names the run and what to do."""


# ----------------------------------------------------------------------------- helpers


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
    """Newest run of ``kind`` under ``root`` with these inputs, complete or not (stage skipping / resuming)."""
    for info in reversed(registry.list_runs(root, kind=kind)):
        if info.complete != complete:
            continue
        inputs = read_inputs(info.url)
        if inputs and inputs.get("fingerprint") == fingerprint:
            return info
    return None


def _finish(run_url: str, *, metrics: dict | None = None) -> dict:
    """Index the run's files (files.json) and mark it complete, in that order."""
    from vit.runs import RunFolder

    registry.write_file_index(run_url)
    return RunFolder(run_url).finish(status="complete", metrics=metrics)


def _mark_failed(run_url: str, err: BaseException) -> None:
    from vit.runs import RunFolder

    folder = RunFolder(run_url)
    if storage.exists(folder.run_json):
        meta = folder.finish(status="failed")
        meta["error"] = str(err).splitlines()[0][:500] if str(err) else type(err).__name__
        storage.write_json(folder.run_json, meta)


# ----------------------------------------------------------------------------- shard stage


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
    if manifest.get("settings") != wanted:
        return None
    if (manifest.get("source") or {}).get("fingerprint") != source_fingerprint(params.source, format=wanted["format"]):
        return None
    return manifest


def shard_stage(params: DatasetParams, *, map_shards=None) -> dict:
    """Shard ``params.source`` into ``params.url`` unless the same dataset is already there.

    ``map_shards(tasks) -> list[entry]`` writes the shards, one ``shards.ShardTask`` each
    (Prefect ``.map`` in the flow; a plain loop by default); each is idempotent, so a re-run
    after a crash keeps the complete shards. Returns the manifest, with ``skipped_stage``
    True when nothing had to be written.
    """
    from shards import finish_dataset, plan_shards, write_shard

    existing = existing_dataset(params)
    if existing is not None:
        return {**existing, "skipped_stage": True}
    if params.source is None:
        raise StageError(f"{params.url}: no manifest.json and no source to shard; set source (a class-folder tree) "
                         "or shard it with `vitpipe shard`")
    storage.check_writable(params.url)
    plan = plan_shards(params.source, params.url, name=params.name, shard_size=params.shard_size, **params.settings)
    entries = map_shards(plan.tasks) if map_shards is not None else [write_shard(task) for task in plan.tasks]
    return {**finish_dataset(plan, entries), "skipped_stage": False}


# ----------------------------------------------------------------------------- training stages


def build_run_config(params: TrainParams, *, dataset_url: str, root: str, run_id: str, init_from: str | None = None,
                     parent: str | None = None):
    """The vit.config.RunConfig of a stage: preset + overrides + where the data and the run live."""
    from pipeline.launcher import make_run_config

    return make_run_config(params.preset, data=dataset_url, out=root, run_id=run_id, nproc=params.nproc_per_node,
                           steps=params.steps, hostfile=params.hostfile, launcher=params.launcher, init_from=init_from,
                           parent=parent, sets=list(params.set))


_RUN_SPECIFIC = ("run_url", "run_id", "local_dir")


def train_fingerprint(cfg, *, kind: str, lineage: dict) -> str:
    """Hash of what decides a training run's result: config (minus where it lives), dataset manifest, parent."""
    data = {k: v for k, v in cfg.to_dict().items() if k not in _RUN_SPECIFIC}
    data["launch"] = {k: v for k, v in data["launch"].items() if k != "log_dir"}
    return _digest({"kind": kind, "config": data, "manifest_sha256": lineage["manifest_sha256"], "parent": cfg.parent})


def prepare_train_run(params: TrainParams, *, kind: str, root: str, dataset_url: str,
                      init_from: str | None = None, parent: str | None = None) -> dict:
    """Decide what a training stage does: ``skip`` (complete run with the same inputs), ``resume`` or ``new``.

    Returns {action, run_id, run_url, config (RunConfig), fingerprint, lineage}. For resume/new
    the run folder holds ``config.json``, ``inputs.json`` and a ``running`` run.json on return.
    """
    from vit.runs import RunFolder, new_run_id

    lineage = dataset_lineage(dataset_url)
    cfg = build_run_config(params, dataset_url=dataset_url, root=root, run_id=f"{kind}-pending", init_from=init_from, parent=parent)
    fingerprint = train_fingerprint(cfg, kind=kind, lineage=lineage)
    done = find_run(root, kind=kind, fingerprint=fingerprint, complete=True)
    if done is not None:
        if not storage.exists(storage.join(done.url, registry.FILE_INDEX)):  # crashed between complete and indexing
            registry.write_file_index(done.url)
        return {"action": "skip", "run_id": done.run_id, "run_url": done.url, "config": cfg, "fingerprint": fingerprint, "lineage": lineage}
    unfinished = find_run(root, kind=kind, fingerprint=fingerprint, complete=False)
    run_id = unfinished.run_id if unfinished else new_run_id(kind)
    folder = RunFolder.create(root, run_id)
    cfg = build_run_config(params, dataset_url=dataset_url, root=root, run_id=run_id, init_from=init_from, parent=parent)
    storage.write_json(folder.file(INPUTS_JSON), {"fingerprint": fingerprint, "kind": kind, "parent": parent, "lineage": lineage})
    storage.write_json(folder.config, cfg.to_dict())
    folder.start(kind=kind, parent=parent, lineage=lineage)
    return {"action": "resume" if unfinished else "new", "run_id": run_id, "run_url": folder.url, "config": cfg,
            "fingerprint": fingerprint, "lineage": lineage}


def launch_once(cfg, *, stall_timeout: float, progress_every: float = 10.0) -> None:
    """One launch of the ranks of ``cfg`` (raises pipeline.launcher.LaunchError on failure or stall).

    While the ranks run, the newest line of the run's metrics.csv is printed every
    ``progress_every`` seconds, so a long launch shows its progress.
    """
    import threading

    from pipeline.launcher import launch, local_dir

    metrics = os.path.join(local_dir(cfg), "metrics.csv")
    done = threading.Event()

    def watch() -> None:
        shown = None
        while not done.wait(progress_every):
            try:
                with open(metrics, encoding="utf-8") as fh:
                    lines = fh.read().strip().splitlines()
            except OSError:
                continue
            if len(lines) > 1 and lines[-1] != shown:
                shown = lines[-1]
                row = dict(zip(lines[0].split(","), lines[-1].split(",")))
                shown_cols = ", ".join(f"{k}={row[k]}" for k in ("loss", "lr", "images_per_sec") if k in row)
                print(f"{cfg.run_id}: step {row.get('step', '?')}/{cfg.schedule.total_steps} {shown_cols}", flush=True)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        launch(cfg, stall_timeout=stall_timeout)
    finally:
        done.set()


def complete_train_run(run_url: str) -> dict:
    """After the ranks exit 0: check the model is there, index files, mark complete (if the trainer has not)."""
    from vit.runs import RunFolder

    folder = RunFolder(run_url)
    if not storage.exists(folder.model):
        raise StageError(f"{run_url}: the ranks exited but wrote no model.safetensors; see the rank logs")
    meta = folder.read_run() or {}
    return _finish(run_url, metrics=meta.get("metrics"))


def train_stage(params: TrainParams, *, kind: str, root: str, dataset_url: str, init_from: str | None = None,
                parent: str | None = None, launch_fn=None) -> dict:
    """A whole training stage without Prefect: prepare (skip/resume/new), launch with retries, complete.

    ``launch_fn(cfg)`` runs the ranks once (default: ``launch_once`` with the stall timeout);
    a LaunchError is retried ``params.retries`` times, each attempt resuming from the last
    checkpoint in the same run folder. Returns {run_id, run_url, skipped, attempts}.
    """
    from pipeline.launcher import LaunchError

    plan = prepare_train_run(params, kind=kind, root=root, dataset_url=dataset_url, init_from=init_from, parent=parent)
    if plan["action"] == "skip":
        return {"run_id": plan["run_id"], "run_url": plan["run_url"], "skipped": True, "attempts": 0}
    launch_fn = launch_fn or (lambda cfg: launch_once(cfg, stall_timeout=params.stall_timeout))
    attempts = 0
    while True:
        attempts += 1
        try:
            launch_fn(plan["config"])
            break
        except LaunchError as err:
            if attempts > params.retries:
                _mark_failed(plan["run_url"], err)
                raise
        except BaseException as err:
            _mark_failed(plan["run_url"], err)
            raise
    complete_train_run(plan["run_url"])
    return {"run_id": plan["run_id"], "run_url": plan["run_url"], "skipped": False, "attempts": attempts}


# ----------------------------------------------------------------------------- evaluate stage


def evaluate_stage(params: EvalParams, *, root: str, model_run: str, dataset_url: str) -> dict:
    """Evaluate the model of run ``model_run`` (URL) on ``dataset_url`` into a new `evaluate` run.

    The run folder gets metrics.json, the eval report (confusion, per-class accuracy), the
    HTML run report of the model (``vit.report.write_report``) and files.json; it is skipped
    when a complete evaluation of the same model file on the same dataset exists.
    """
    from vit.evaluate import EvalJob, run_eval_job, scalar_metrics
    from vit.runs import RunFolder, new_run_id

    parent = registry.resolve(model_run, root=root)
    model_run = parent.url
    if not parent.complete:
        raise StageError(f"{model_run}: run is {parent.status}, not complete; re-run its stage first")
    lineage = dataset_lineage(dataset_url)
    model_sha = storage.sha256_url(storage.join(model_run, "model.safetensors"))
    fingerprint = _digest({"kind": "evaluate", "model_sha256": model_sha, "manifest_sha256": lineage["manifest_sha256"],
                           "batch_size": params.batch_size, "img_size": params.img_size, "report": params.report})
    done = find_run(root, kind="evaluate", fingerprint=fingerprint, complete=True)
    if done is not None:
        return {"run_id": done.run_id, "run_url": done.url, "skipped": True, "metrics": done.metrics,
                "report": _existing_report(done.url)}
    folder = RunFolder.create(root, new_run_id("evaluate"))
    storage.write_json(folder.file(INPUTS_JSON), {"fingerprint": fingerprint, "kind": "evaluate", "parent": parent.run_id,
                                                   "model_sha256": model_sha, "lineage": lineage})
    job = EvalJob(source=model_run, data=dataset_url, img_size=params.img_size, batch_size=params.batch_size,
                  report_dir=folder.report, result=folder.file("metrics.json"))
    storage.write_json(folder.config, {"evaluate": params.model_dump(), "job": job.__dict__})
    folder.start(kind="evaluate", parent=parent.run_id, lineage=lineage)
    try:
        metrics = scalar_metrics(run_eval_job(job))
        report = None
        if params.report:
            from vit.report import write_report

            report = write_report(model_run, out_dir=storage.join(folder.report, "model"))
        _finish(folder.url, metrics=metrics)
    except BaseException as err:
        _mark_failed(folder.url, err)
        raise
    return {"run_id": folder.run_id, "run_url": folder.url, "skipped": False, "metrics": metrics,
            "report": report and {"html": report["html"], "pngs": report["pngs"], "markdown": report["markdown"]}}


def _existing_report(run_url: str) -> dict | None:
    html = storage.join(run_url, "report", "model", "report.html")
    if not storage.exists(html):
        return None
    md = storage.join(run_url, "report", "model", "report.md")
    return {"html": html, "pngs": [], "markdown": storage.read_bytes(md).decode() if storage.exists(md) else ""}


# ----------------------------------------------------------------------------- Prefect


def _is_transient(task, task_run, state) -> bool:
    """Retry a shard write when its error says a retry may succeed (`VitpipeError.transient`: a store
    that is down or busy), never on bad input or bad credentials."""
    try:
        state.result()
    except VitpipeError as err:
        return err.transient
    except (ConnectionError, TimeoutError):
        return True
    except Exception:
        return False
    return False


def make_task_runner(params: TaskRunnerParams):
    """The Prefect task runner for fan-out: Dask (local processes or a cluster's address) or threads."""
    if params.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=params.workers)
    from prefect_dask import DaskTaskRunner

    if params.address:
        return DaskTaskRunner(address=params.address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": params.workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


@task(name="write-shard", retries=3, retry_delay_seconds=[1, 5, 20], retry_condition_fn=_is_transient, cache_policy=NO_CACHE)
def write_shard_task(boxed: "_Boxed") -> dict:
    from shards import write_shard

    return write_shard(boxed.value)


class _Boxed:
    """Hides a shards.ShardTask from Prefect's parameter introspection (which rebuilds dataclasses)."""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value

    def __getstate__(self):
        return self.value

    def __setstate__(self, value) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"<{getattr(self.value, 'name', type(self.value).__name__)}>"


@task(name="launch-ranks", cache_policy=NO_CACHE)
def launch_task(cfg, stall_timeout: float) -> None:
    launch_once(cfg, stall_timeout=stall_timeout)


@task(name="evaluate-model", cache_policy=NO_CACHE)
def evaluate_task(params: EvalParams, root: str, model_run: str, dataset_url: str) -> dict:
    return evaluate_stage(params, root=root, model_run=model_run, dataset_url=dataset_url)


@flow(name="shard_dataset", log_prints=True, task_runner=make_task_runner(TaskRunnerParams(kind="threads")))
def shard_dataset(params: DatasetParams) -> dict:
    """Shard an image corpus into WebDataset tars + manifest.json (skipped when the same dataset exists)."""
    def map_shards(tasks):
        print(f"sharding {params.source} -> {params.url}: {len(tasks)} shards, one task each")
        return write_shard_task.map([_Boxed(t) for t in tasks]).result()

    manifest = shard_stage(params, map_shards=map_shards)
    verb = "exists, skipped" if manifest["skipped_stage"] else "written"
    print(f"dataset {params.url} {verb}: {manifest['num_samples']} samples in {len(manifest['shards'])} shards, "
          f"{len(manifest['classes'])} classes")
    return manifest


def _train_flow(params: TrainParams, kind: str, root: str, dataset_url: str, init_from: str | None, parent: str | None) -> dict:
    def launch_fn(cfg) -> None:  # each attempt is its own task run in the UI; train_stage retries
        print(f"{kind}: launching {cfg.run_id} ({cfg.preset}, {cfg.launch.world_size} ranks) into {cfg.run_url}")
        launch_task(cfg, params.stall_timeout)

    out = train_stage(params, kind=kind, root=root, dataset_url=dataset_url, init_from=init_from, parent=parent,
                      launch_fn=launch_fn)
    if out["skipped"]:
        print(f"{kind}: complete run {out['run_id']} has the same inputs, skipped")
    else:
        _run_markdown(kind, out["run_id"], out["run_url"], registry.read_run(out["run_url"]).__dict__)
    return out


def _run_markdown(kind: str, run_id: str, run_url: str, meta: dict, extra: str = "") -> None:
    metrics = "\n".join(f"| {k} | {v} |" for k, v in sorted((meta.get("metrics") or {}).items()))
    files = registry.read_file_index(run_url)
    listing = "\n".join(f"- `{storage.join(run_url, name)}` ({entry['bytes']} B)" for name, entry in sorted(files.items())
                        if not name.startswith("checkpoints/"))
    body = (f"# {kind} run `{run_id}`\n\n`{run_url}`; parent `{meta.get('parent')}`\n\n"
            f"| metric | value |\n|---|---|\n{metrics}\n\n{extra}\n\n## Files\n{listing}\n\n"
            f"Download: `vitpipe artifacts get {run_url} DEST`\n")
    create_markdown_artifact(markdown=body, key=_artifact_key(kind), description=f"{kind} run {run_id}")


@flow(name="pretrain", log_prints=True)
def pretrain(params: TrainParams, root: str, dataset_url: str) -> dict:
    """Pretrain a ViT with DeepSpeed on the shards at dataset_url (skipped when an equal run is complete)."""
    return _train_flow(params, "pretrain", root, dataset_url, None, None)


@flow(name="finetune", log_prints=True)
def finetune(params: TrainParams, root: str, dataset_url: str, pretrain_run: str = "latest:pretrain") -> dict:
    """Fine-tune a pretrained run (URL, run id or latest:pretrain) at the preset's resolution with a zero-initialised head."""
    parent = registry.resolve(pretrain_run, root=root)
    if not parent.complete:
        raise StageError(f"{parent.url}: pretrain run is {parent.status}; re-run pretraining first")
    return _train_flow(params, "finetune", root, dataset_url, parent.url, parent.run_id)


@flow(name="evaluate", log_prints=True)
def evaluate(params: EvalParams, root: str, dataset_url: str, model_run: str = "latest:finetune") -> dict:
    """Evaluate a fine-tuned run (URL, run id or latest:finetune) on a dataset; publishes metrics, the eval table and the run report."""
    out = evaluate_task(params, root, model_run, dataset_url)
    m = out["metrics"]
    print(f"evaluate: {out['run_id']} top1={m.get('top1')} ({'skipped, already evaluated' if out['skipped'] else 'new'})")
    rows = [{"metric": k, "value": v} for k, v in sorted(m.items()) if isinstance(v, (int, float))]
    create_table_artifact(table=rows, key="evaluation-results", description=f"evaluation {out['run_id']} of {model_run}")
    if out.get("report"):
        report = out["report"]
        extra = report.get("markdown", "") + f"\n\nHTML report: `{report['html']}`\n\n" + _figures_markdown(report.get("pngs", []))
        _run_markdown("evaluate", out["run_id"], out["run_url"], registry.read_run(out["run_url"]).__dict__, extra)
    return out


@flow(name="vit_pipeline", log_prints=True)
def vit_pipeline(config: PipelineConfig) -> dict:
    """Shard -> pretrain -> fine-tune -> evaluate -> report; each stage skipped when its inputs are unchanged."""
    return run_pipeline(config)


def _figures_markdown(png_urls: list[str]) -> str:
    """The training curves inline (a data URI: the UI cannot read s3://), every figure by its stored URL."""
    import base64

    lines = ["## Figures"]
    curves = [u for u in png_urls if u.endswith("curves.png")]
    if curves:
        data = base64.b64encode(storage.read_bytes(curves[0])).decode()
        lines.append(f"![training curves](data:image/png;base64,{data})")
    lines += [f"- `{u}`" for u in png_urls]
    return "\n".join(lines)


def _artifact_key(kind: str) -> str:
    return f"{kind}-run-report"


@contextlib.contextmanager
def prefect_api():
    """Run flows against $PREFECT_API_URL, or else a local temporary Prefect server that child
    processes share (Dask workers would otherwise each start their own and report elsewhere)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    from prefect.server.api.server import SubprocessASGIServer

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network here
    server = SubprocessASGIServer()
    server.start(timeout=180)
    os.environ["PREFECT_API_URL"] = server.api_url  # entry point: inherited by Dask workers
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            try:
                yield server.api_url
            finally:
                _drain_prefect_workers()  # send the last logs/events while the server still listens
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def _drain_prefect_workers() -> None:
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain() -> None:
        try:
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        except RuntimeError:  # never started
            pass
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    run_coro_as_sync(drain())


def check_storage(config: PipelineConfig) -> None:
    """Before any stage: the run root and dataset locations are writable (object store up, credentials, bucket)."""
    for url in (config.root, config.pretrain_data.url, config.finetune_data.url, config.eval_data.url):
        storage.check_writable(url)


def run_pipeline(config: PipelineConfig) -> dict:
    """The body of ``vit_pipeline``: call each stage flow in turn; returns run ids, URLs and top1."""
    if config.s3_endpoint:  # this flow is an entry point (deployments): ranks and Dask workers inherit it
        os.environ["AWS_ENDPOINT_URL"] = config.s3_endpoint
        storage.reset_clients()
    check_storage(config)
    with contextlib.ExitStack() as stack:
        params = config.task_runner
        if params.kind == "dask" and not params.address:  # one local cluster for all shard flows
            from distributed import LocalCluster

            cluster = stack.enter_context(LocalCluster(n_workers=params.workers, threads_per_worker=1, processes=True,
                                                       dashboard_address=None))
            params = params.model_copy(update={"address": cluster.scheduler_address})
        shard = shard_dataset.with_options(task_runner=make_task_runner(params))
        datasets = {name: shard(getattr(config, name)) for name in ("pretrain_data", "finetune_data", "eval_data")}
    pre = pretrain(config.pretrain, config.root, config.pretrain_data.url)
    ft = finetune(config.finetune, config.root, config.finetune_data.url, pre["run_url"])
    ev = evaluate(config.evaluate, config.root, config.eval_data.url, ft["run_url"])
    return {
        "top1": ev["metrics"].get("top1"),
        "runs": {"pretrain": pre["run_id"], "finetune": ft["run_id"], "evaluate": ev["run_id"]},
        "urls": {"pretrain": pre["run_url"], "finetune": ft["run_url"], "evaluate": ev["run_url"],
                 "report": (ev.get("report") or {}).get("html"),
                 "datasets": {k: getattr(config, k).url for k in datasets}},
        "skipped": {"shard": [k for k, m in datasets.items() if m.get("skipped_stage")],
                    "pretrain": pre["skipped"], "finetune": ft["skipped"], "evaluate": ev["skipped"]},
    }
