"""Prefect flows: one per stage (`shard_dataset`, `pretrain`, `finetune`, `evaluate`) and
`vit_pipeline` chaining them.

Flows are thin adapters over the stage layer (`pipeline.stages`): they take the stage's typed
settings (`pipeline.settings`) as parameters, call the same stage function the CLI calls (so a
run folder is the same however it was started) and publish Prefect artifacts. What Prefect adds:
shard writes fanned out as mapped tasks (Dask or threads) and each launch attempt as a task run.
"""
from __future__ import annotations

import contextlib
import os

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from pipeline import registry, stages
from pipeline.settings import DatasetParams, EvalParams, PipelineConfig, TaskRunnerParams, TrainParams
from shards import storage
from shards.errors import VitpipeError

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
def launch_task(cfg, stall_timeout: float):
    from pipeline.launcher import launch

    return launch(cfg, stall_timeout=stall_timeout)


@task(name="evaluate-model", cache_policy=NO_CACHE)
def evaluate_task(params: EvalParams, root: str, model_run: str, dataset_url: str) -> dict:
    return stages.evaluate_stage(params, root=root, model_run=model_run, dataset_url=dataset_url)


@flow(name="shard_dataset", log_prints=True, task_runner=make_task_runner(TaskRunnerParams(kind="threads")))
def shard_dataset(params: DatasetParams) -> dict:
    """Shard an image corpus into WebDataset tars + manifest.json (skipped when the same dataset exists)."""
    def map_shards(tasks):
        print(f"sharding {params.source} -> {params.url}: {len(tasks)} shards, one task each")
        return write_shard_task.map([_Boxed(t) for t in tasks]).result()

    # on a Dask cluster (params.dask_address or $VITPIPE_DASK_ADDRESS) its workers list, scan and write
    manifest = stages.shard_stage(params, map_shards=None if stages.dask_address(params) else map_shards)
    verb = "exists, skipped" if manifest["skipped_stage"] else "written"
    print(f"dataset {params.url} {verb}: {manifest['num_samples']} samples in {len(manifest['shards'])} shards, "
          f"{len(manifest['classes'])} classes")
    return manifest


def _train_flow(params: TrainParams, kind: str, root: str, dataset_url: str, **stage_args) -> dict:
    def launch_fn(cfg):  # each attempt is its own task run in the UI; train_stage retries
        print(f"{kind}: launching {cfg.run_id} ({cfg.preset}, {cfg.launch.world_size} ranks) into {cfg.run_url}")
        return launch_task(cfg, params.stall_timeout)

    out = stages.train_stage(params, kind=kind, root=root, dataset_url=dataset_url, launch_fn=launch_fn, **stage_args)
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
    return _train_flow(params, "pretrain", root, dataset_url)


@flow(name="finetune", log_prints=True)
def finetune(params: TrainParams, root: str, dataset_url: str, pretrain_run: str = "latest:pretrain",
             val_data: str | None = None, eval_params: EvalParams = EvalParams()) -> dict:
    """Fine-tune a pretrained run (URL, run id or latest:pretrain) at the preset's resolution with a zero-initialised
    head; evaluated on val_data (when given) and exported for timm before it is complete."""
    return _train_flow(params, "finetune", root, dataset_url, pretrained=pretrain_run, val_data=val_data,
                       eval_params=eval_params)


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
    ft = finetune(config.finetune, config.root, config.finetune_data.url, pre["run_url"], config.eval_data.url,
                  config.evaluate)
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
