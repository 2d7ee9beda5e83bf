"""pipeline.flows: the stage functions without Prefect, then the real flows on Prefect's local
API with real SeaweedFS, real Dask worker processes and real DeepSpeed ranks (the one
end-to-end vit_pipeline run of this suite).

The pipeline test is the fault scenario of issue 6: the first run retries a pretraining launch
whose rank dies (resuming from its checkpoint), then fails in fine-tuning on bad input; the
second run, input fixed, skips sharding and pretraining and finishes.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import pytest

from pipeline import flows, registry, stages
from pipeline.objectstore import free_port
from pipeline.settings import DatasetParams, PipelineConfig
from pipeline.stages import shard_stage
from shards import storage
from shards.digits import write_digits_tree


@pytest.fixture(scope="module")
def prefect_api():
    """Prefect's local ephemeral API, once for this module (it takes ~20 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """Small digits trees: pretrain on 0-4, fine-tune/evaluate on 5-9 (a different label set)."""
    base = tmp_path_factory.mktemp("trees")
    out = {}
    for split, name, classes in (("train", "pretrain", "01234"), ("train", "finetune", "56789"), ("val", "eval", "56789")):
        full = write_digits_tree(base / f"all-{split}-{name}", split=split, size=16)
        for cls in classes:
            shutil.copytree(full / cls, base / name / cls)
        shutil.rmtree(full)
        out[name] = base / name
    return out


def test_shard_stage_skips_unchanged_dataset_and_reshards_on_change(tmp_path, trees):
    src = tmp_path / "src"
    shutil.copytree(trees["eval"], src)
    params = DatasetParams(source=str(src), url=str(tmp_path / "ds"), name="val", shard_size=100)

    first = shard_stage(params)
    assert not first["skipped_stage"] and first["num_samples"] == sum(1 for _ in src.rglob("*.png"))
    assert len(first["shards"]) == -(-first["num_samples"] // 100)
    manifest_mtime = os.path.getmtime(tmp_path / "ds" / "manifest.json")

    again = shard_stage(params)  # same source fingerprint and settings: nothing is written
    assert again["skipped_stage"] and again["created"] == first["created"]
    assert os.path.getmtime(tmp_path / "ds" / "manifest.json") == manifest_mtime

    changed = shard_stage(params.model_copy(update={"shard_size": 50}))  # other settings: re-shard
    assert not changed["skipped_stage"] and len(changed["shards"]) == -(-first["num_samples"] // 50)

    shutil.copy(next((src / "5").glob("*.png")), src / "5" / "extra_copy.png")  # the source changed
    grown = shard_stage(params.model_copy(update={"shard_size": 50}))
    assert not grown["skipped_stage"]
    assert grown["source"]["fingerprint"] != changed["source"]["fingerprint"]


def test_shard_stage_without_source_or_manifest_says_what_to_do(tmp_path):
    with pytest.raises(stages.StageError, match="no manifest.json and no source"):
        shard_stage(DatasetParams(url=str(tmp_path / "nothing")))


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_the_shard_flow_s_worker_processes_exit_cleanly(prefect_api, trees, tmp_path, monkeypatch):
    """The shard_dataset flow forks its scan pool (shards.workers.process_pool) inside a flow run, where
    Prefect's log and event services have registered callbacks for the shutdown of their threads; a
    forked worker inherited them, failed in them at exit and exited with code 1."""
    from shards import workers

    forked, process_pool = [], workers.process_pool

    def recording(n):
        pool = process_pool(n)
        forked.extend(pool._processes.values())
        return pool

    monkeypatch.setattr(workers, "process_pool", recording)
    manifest = flows.shard_dataset(DatasetParams(source=str(trees["eval"]), url=str(tmp_path / "ds"), name="val",
                                                 shard_size=100, workers=2))
    assert manifest["num_samples"] > 0 and len(forked) == 2
    for proc in forked:
        proc.join(30)
    assert [proc.exitcode for proc in forked] == [0, 0]


def _config(root: str, data_root: str, trees, *, finetune_set: list[str]) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "root": root,
        "pretrain_data": {"source": str(trees["pretrain"]), "url": f"{data_root}/pre", "name": "pre", "shard_size": 100},
        "finetune_data": {"source": str(trees["finetune"]), "url": f"{data_root}/ft", "name": "ft", "shard_size": 100},
        "eval_data": {"source": str(trees["eval"]), "url": f"{data_root}/val", "name": "val", "shard_size": 100},
        # rank 0 dies after step 2 (after checkpointing it): the flow relaunches, the run resumes at step 2
        "pretrain": {"preset": "digits_tiny", "steps": 4, "nproc_per_node": 2, "retries": 1, "stall_timeout": 300,
                     "master_port": free_port(),  # other suites launch DeepSpeed at the same time: never 29500
                     "set": ["checkpoint.every_steps=2", "schedule.warmup_steps=1"]},
        "finetune": {"preset": "digits_tiny_ft", "steps": 3, "nproc_per_node": 1, "retries": 0, "stall_timeout": 300,
                     "master_port": free_port(),
                     "set": finetune_set},
        "evaluate": {"batch_size": 256, "report": True},
        "task_runner": {"kind": "dask", "workers": 2},  # shard tasks on a local Dask cluster of worker processes
    })


def _task_runs(prefix: str, *, besides: frozenset = frozenset()) -> list:
    """The task runs named `prefix`* on the server, other than those with ids in `besides` (made by
    earlier tests against the same server)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=prefix)),
                                     sort=TaskRunSort.ID_DESC, limit=200)
    return [r for r in runs if r.name.startswith(prefix) and r.id not in besides]


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_pipeline_retries_fails_and_resumes_after_last_completed_stage(prefect_api, s3, trees, tmp_path, monkeypatch):
    root = s3.url(f"pipe-{time.time_ns()}")
    earlier = frozenset(r.id for prefix in ("write-shard", "launch-ranks") for r in _task_runs(prefix))
    monkeypatch.setenv("VITPIPE_FAULT", "step=2:fail")  # test-only: rank 0 dies after step 2 (first launch only)
    # bad input: resume a fine-tune that has no checkpoint
    bad = _config(root, f"{root}/datasets", trees, finetune_set=['checkpoint.resume="must"'])
    with pytest.raises(Exception, match="checkpoint.resume=must"):
        flows.vit_pipeline(bad)

    # one write-shard task per shard, each completed (on the Dask workers)
    manifests = [storage.read_json(storage.join(d.url, "manifest.json")) for d in (bad.pretrain_data, bad.finetune_data, bad.eval_data)]
    writes = _task_runs("write-shard", besides=earlier)
    assert len(writes) == sum(m["num_shards"] for m in manifests) >= 12 and all(r.state.is_completed() for r in writes)
    launches = _task_runs("launch-ranks", besides=earlier)  # pretrain: failed + relaunched; finetune: refused before any launch
    assert sorted(r.state.type.value for r in launches) == ["COMPLETED", "FAILED"]

    runs = {r.kind: r for r in registry.list_runs(root)}
    assert set(runs) == {"pretrain"}  # the bad fine-tune input was refused before its run folder was made
    pre = runs["pretrain"]
    assert pre.complete and pre.metrics["steps"] == 4
    log = storage.read_bytes(storage.join(pre.url, "metrics.csv")).decode().splitlines()
    assert [int(line.split(",")[0]) for line in log[1:]] == [1, 2, 3, 4]  # resumed at step 2, not restarted
    pre_files = storage.read_json(storage.join(pre.url, "files.json"))

    # fixed input: shard and pretrain are skipped, fine-tune and evaluate run
    monkeypatch.delenv("VITPIPE_FAULT")
    good = _config(root, f"{root}/datasets", trees, finetune_set=[])
    result = flows.vit_pipeline(good)
    assert result["skipped"] == {"shard": ["pretrain_data", "finetune_data", "eval_data"], "pretrain": True,
                                 "finetune": False, "evaluate": False}
    assert result["runs"]["pretrain"] == pre.run_id
    assert storage.read_json(storage.join(pre.url, "files.json")) == pre_files  # earlier artifacts untouched
    assert 0.0 <= result["top1"] <= 1.0

    # lineage: eval -> finetune -> pretrain, each with dataset manifest sha256, fingerprint, code version, config
    ev = registry.read_run(result["urls"]["evaluate"])
    ft = registry.read_run(result["urls"]["finetune"])
    assert ev.complete and ft.complete and ev.parent == ft.run_id and ft.parent == pre.run_id
    assert ev.metrics["top1"] == result["top1"]
    for run, data in ((pre, good.pretrain_data.url), (ft, good.finetune_data.url), (ev, good.eval_data.url)):
        lineage = registry.read_run(run.url).lineage
        assert lineage["dataset_url"] == data
        assert lineage["manifest_sha256"] == storage.sha256_url(storage.join(data, "manifest.json"))
        assert lineage["source_fingerprint"] == storage.read_json(storage.join(data, "manifest.json"))["source"]["fingerprint"]
        assert lineage["code_version"]
        assert storage.exists(storage.join(run.url, "config.json"))
    assert storage.read_json(storage.join(ft.url, "config.json"))["model"]["img_size"] == 32  # higher resolution
    assert storage.exists(result["urls"]["report"]) and result["urls"]["report"].startswith(ev.url)

    # the newest complete fine-tune is the fixed one, never the failed one; its files check out
    assert registry.latest(root, "finetune").run_id == ft.run_id
    got = registry.get_run("latest:finetune", str(tmp_path / "ft"), root=root, file="model.safetensors")
    assert os.path.getsize(got[0]) > 10_000

    # Prefect artifacts: a markdown report per run and the table of evaluation results
    import httpx
    from prefect.settings import PREFECT_API_URL

    def artifacts(*keys: str) -> dict:
        got = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", timeout=30,
                         json={"artifacts": {"key": {"any_": list(keys)}}, "sort": "CREATED_DESC", "limit": 50, "offset": 0})
        got.raise_for_status()
        out = {}
        for a in got.json():  # newest first
            out.setdefault(a["key"], a)
        return out

    table = artifacts("evaluation-results")["evaluation-results"]["data"]
    reports = {k: a["data"] for k, a in artifacts("pretrain-run-report", "finetune-run-report", "evaluate-run-report").items()}
    rows = json.loads(table) if isinstance(table, str) else table
    assert {"metric": "top1", "value": result["top1"]} in rows
    assert set(reports) == {"pretrain-run-report", "finetune-run-report", "evaluate-run-report"}
    assert ft.run_id in reports["finetune-run-report"] and "model.safetensors" in reports["finetune-run-report"]
    assert "report.html" in reports["evaluate-run-report"] and ".png" in reports["evaluate-run-report"]
    assert "![training curves](data:image/png;base64," in reports["evaluate-run-report"]

    # a third run changes nothing
    again = flows.vit_pipeline(good)
    assert again["skipped"]["pretrain"] and again["skipped"]["finetune"] and again["skipped"]["evaluate"]
    assert again["runs"] == result["runs"]


@pytest.mark.integration
@pytest.mark.parametrize("fault", ["missing bucket", "wrong credentials", "store not running"])
def test_pipeline_stops_before_any_stage_on_object_store_faults(fault, s3, trees, tmp_path, capsys, monkeypatch):
    import yaml

    from pipeline.cli import main
    from pipeline.objectstore import free_port

    data = "s3://no-such-bucket/data" if fault == "missing bucket" else s3.url("x/data")
    cfg = _config(s3.url("x"), data, trees, finetune_set=[]).model_dump()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    if fault == "wrong credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    if fault == "store not running":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    storage.reset_clients()
    try:
        assert main(["run", str(path)]) == (1 if fault == "store not running" else 2)  # down: job failed; else input
    finally:
        monkeypatch.undo()
        storage.reset_clients()
    err = capsys.readouterr().err.strip()
    expect = {"missing bucket": "bucket 'no-such-bucket' does not exist",
              "wrong credentials": "access denied",
              "store not running": "cannot reach S3 endpoint"}[fault]
    assert err.count("\n") == 0 and expect in err, err
    assert "not-the-secret" not in err
    assert registry.list_runs(s3.url("x")) == []
