"""Real DeepSpeed ranks on CPU (gloo) training digits_tiny on the digits shards.

Few launches, each checked for several things:
  A  2 ranks, rank 1 killed (exit 13) after step 20        -> LaunchError names rank 1 + code 13
  B  the same run again on 1 rank                         -> resumes from step 20 through a universal
                                                             checkpoint, ends at the planned step count,
                                                             every sample of epoch 0 seen exactly once
  C  `vitpipe pretrain` on 1 rank, stopped after 8 steps  -> same first losses as A (1 vs 2 ranks)
  D  2 "nodes" x 1 rank over loopback (--hostfile --no_ssh --node_rank), run folder in S3
  E  1 rank that hangs                                    -> the stall watchdog kills it
"""
from __future__ import annotations

import csv
import json
import math
import os
import threading
from pathlib import Path

import pytest

from pipeline.launcher import LaunchError, launch, make_run_config
from pipeline.objectstore import free_port
from shards import storage
from vit.runs import RunFolder
from vit.status import read_status, status_path

TOTAL = 36
pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def read_metrics(url: str) -> list[dict]:
    text = storage.read_bytes(url).decode()
    return list(csv.DictReader(text.splitlines()))


def digits_cfg(data, out, run_id, *, nproc=1, sets=(), **kw):
    return make_run_config("digits_tiny", data=data, out=str(out), run_id=run_id, nproc=nproc, steps=TOTAL,
                           master_port=free_port(), sets=["checkpoint.every_steps=10", "launch.cpu_threads_per_rank=1", *sets], **kw)


@pytest.fixture(scope="module")
def fault_and_resume(digits_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = digits_cfg(digits_shards, out, "fault", nproc=2)
    with pytest.raises(LaunchError) as info:  # test-only fault injection: never in the run config
        launch(cfg, timeout=300, env={"VITPIPE_FAULT": "step=20:fail:rank=1:keys"})
    run = RunFolder(cfg.run_url)
    first_metrics = read_metrics(run.metrics)
    latest_after_fault = run.latest_checkpoint()
    status_after_fault = read_status(status_path(cfg.log_dir, 0))
    resumed = digits_cfg(digits_shards, out, "fault", nproc=1)
    result = launch(resumed, timeout=300, env={"VITPIPE_FAULT": "keys"})
    return {"error": info.value, "run": run, "first_metrics": first_metrics, "latest_after_fault": latest_after_fault,
            "status_after_fault": status_after_fault,
            "result": result, "out": out}


def test_failed_rank_is_reported_with_exit_code_and_log(fault_and_resume):
    err = fault_and_resume["error"]
    assert err.rank == 1 and err.rank_exit_code == 13 and err.transient
    assert "rank 1 failed with exit code 13: fault injection after step 20" in str(err) and "\n" not in str(err)
    assert "fault injection: rank 1" in err.log_tail  # the rank's own log, for the human
    assert fault_and_resume["latest_after_fault"] == "step00000020"
    rank0 = fault_and_resume["status_after_fault"]  # what rank 0 reported, structured
    assert rank0[0]["event"] == "started" and rank0[0]["world_size"] == 2
    assert [r["step"] for r in rank0 if r["event"] == "step"] == list(range(1, 21))
    assert {"loss", "images_per_sec", "corrupt", "samples"} <= set(rank0[1])
    assert [r["step"] for r in rank0 if r["event"] == "checkpoint"] == [10, 20]
    assert rank0[-1]["event"] == "terminated"  # stopped by the launcher when rank 1 died


def test_two_ranks_loss_falls(fault_and_resume):
    losses = [float(r["loss"]) for r in fault_and_resume["first_metrics"]]
    assert len(losses) == 20
    assert losses[0] == pytest.approx(math.log(10), abs=0.05)  # zero-initialised head
    assert sum(losses[-5:]) / 5 < losses[0] - 0.15


def test_resume_on_one_rank_finishes_the_planned_steps(fault_and_resume):
    run = fault_and_resume["run"]
    rows = read_metrics(run.metrics)
    assert [int(r["step"]) for r in rows] == list(range(1, TOTAL + 1))
    assert {"step", "epoch", "loss", "lr", "images_per_sec", "mfu"} <= set(rows[0])
    assert rows[:20] == fault_and_resume["first_metrics"]  # the pre-fault history is kept, not re-logged
    final = fault_and_resume["result"].final
    assert final["event"] == "finished" and final["steps"] == TOTAL and final["corrupt"] == 0
    assert not os.path.exists(run.run_json)  # the launcher and the ranks never write run.json: the stage layer does
    assert os.path.exists(run.model) and os.path.exists(run.model_config)
    assert run.latest_checkpoint() == f"step{TOTAL:08d}"
    log = Path(fault_and_resume["result"].rank_logs[0]).read_text()
    assert "written by 2 ranks, now 1: converting to universal" in log
    assert "resumed from" in log and "at step 20" in log
    from vit.checkpoint import load_model

    model = load_model(run.url)
    assert model.config["num_classes"] == 10


def test_resumed_epoch_sees_every_sample_exactly_once(fault_and_resume):
    keys_dir = Path(fault_and_resume["run"].url) / "keys"
    records = [json.loads(line) for f in sorted(keys_dir.glob("rank*.jsonl")) for line in f.read_text().splitlines()]
    before = [r for r in records if r["world_size"] == 2 and r["epoch"] == 0]
    after = [r for r in records if r["world_size"] == 1 and r["epoch"] == 0]
    assert {r["step"] for r in before} == set(range(20)) and {r["step"] for r in after} >= {20}
    epoch_steps = max(r["step"] for r in after) + 1
    keys = [k for r in before + after for k in r["keys"]]
    assert len(keys) == epoch_steps * 64
    assert len(set(keys)) == len(keys)  # no sample twice, none lost across 2 -> 1 ranks


def test_loss_parity_one_rank_vs_two_ranks_via_cli(fault_and_resume, digits_shards, capsys):
    from pipeline.cli import main

    out = fault_and_resume["out"]
    code = main(["pretrain", "--preset", "digits_tiny", "--data", digits_shards, "--out", str(out), "--run-id", "single",
                 "--nproc", "1", "--steps", str(TOTAL), "--master-port", str(free_port()),
                 "--set", "checkpoint.every_steps=10", "--set", "launch.cpu_threads_per_rank=1", "--set", "stop_after=8"])
    printed = capsys.readouterr().out
    assert code == 0 and "run id: single" in printed and f"run folder: {out}/runs/single" in printed
    run = RunFolder(str(out / "runs" / "single"))
    one = [float(r["loss"]) for r in read_metrics(run.metrics)]
    two = [float(r["loss"]) for r in fault_and_resume["first_metrics"][:8]]
    assert len(one) == 8
    assert one == pytest.approx(two, rel=2e-3, abs=2e-3)
    assert json.loads(Path(run.run_json).read_text())["status"] == "running"  # stopped early, resumable
    assert run.latest_checkpoint() == "step00000008"


def test_two_nodes_over_loopback_to_s3(digits_shards, s3, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    port, out = free_port(), s3.url("train-runs")
    cfgs = [
        digits_cfg(digits_shards, out, "twonode", hostfile=str(hostfile), no_ssh=True, node_rank=i,
                   master_addr="127.0.0.1", sets=[f"launch.master_port={port}", f"local_dir=\"{tmp_path / f'node{i}'}\"",
                                                  "schedule.total_steps=12", "checkpoint.every_steps=6"])
        for i in range(2)
    ]
    results, errors = {}, {}

    def node(i):
        try:
            results[i] = launch(cfgs[i], timeout=300)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors[i] = err

    threads = [threading.Thread(target=node, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    run = RunFolder(cfgs[0].run_url)
    assert storage.is_s3(run.url)
    assert [int(r["step"]) for r in read_metrics(run.metrics)] == list(range(1, 13))
    assert results[0].final["event"] == results[1].final["event"] == "finished"  # each node's ranks, from their status
    assert storage.exists(run.model) and storage.exists(run.model_config)
    assert storage.exists(storage.join(run.url, "timm", "model.safetensors"))  # the timm model folder, in S3 too
    assert storage.read_json(storage.join(run.url, "timm", "config.json"))["architecture"] == "vit_tiny_patch16_224"
    names = storage.listdir(run.file("checkpoints", "step00000012"))
    assert any("zero_pp_rank_0" in n for n in names) and any("zero_pp_rank_1" in n for n in names)
    assert storage.read_bytes(run.file("checkpoints", "latest")).decode() == "step00000012"


def test_stall_watchdog_kills_a_hung_launch(digits_shards, tmp_path):
    cfg = digits_cfg(digits_shards, tmp_path, "hang")
    with pytest.raises(LaunchError, match="stalled: rank 0 reported no new step for 6s"):
        launch(cfg, stall_timeout=6, timeout=300, env={"VITPIPE_FAULT": "step=2:hang"})
    assert int(read_metrics(RunFolder(cfg.run_url).metrics)[-1]["step"]) == 2
