"""pipeline.cluster: every preset resolves at every cluster size a user picks (`--check` through the
real CLI), the multi-node flags either describe the whole job or are refused in one line, and the
one-launcher-per-node form without a hostfile trains as a 2-node job (real DeepSpeed, loopback)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.cluster import WORLD_SIZES, ClusterError, data_workers, launch_overrides, node_hostfile
from pipeline.launcher import build_argv, make_run_config
from pipeline.objectstore import free_port
from shards.errors import VitpipeError
from vit.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
# the CPU toy presets pin their lanes to the 9-shard digits dataset: valid on 1-2 ranks only
PINNED = sorted(name for name, preset in PRESETS.items() if preset().data.lanes != 0)


def _check_argv(preset: str, world: int) -> list[str]:
    nproc = min(world, 8)  # 8 GPUs per node, as deploy/ assumes
    task = PRESETS[preset]().task
    sub = ["pretrain"] if task == "pretrain" else ["finetune", "--pretrained", "s3://b/runs/pretrain-x"]
    return [*sub, "--preset", preset, "--data", "s3://b/datasets/d", "--out", "s3://b", "--run-id", "r",
            "--nnodes", str(world // nproc), "--nproc", str(nproc), "--check"]


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_check_every_preset_at_every_cluster_size(preset, world, capsys):
    code = main(_check_argv(preset, world))
    out, err = capsys.readouterr()
    if preset in PINNED and world > 2:
        assert code == 2 and out == "", out
        assert err.count("\n") == 1 and ("--set data.lanes=" in err or "--set batch.global_batch_size=" in err), err
        return
    assert code == 0, err
    text, layout = out.rsplit("}\n", 1)
    cfg = json.loads(text + "}")
    g, micro, lanes = cfg["batch"]["global_batch_size"], cfg["batch"]["micro_batch_size"], cfg["data"]["lanes"]
    launch = cfg["launch"]
    assert launch["num_nodes"] * launch["nproc_per_node"] == world
    assert g % (world * micro) == 0  # DeepSpeed: train_batch = micro x accumulation x world
    assert micro <= PRESETS[preset]().batch.micro_batch_size  # never above the preset's memory cap
    assert lanes % world == 0 and g % lanes == 0  # vit.data: every rank the same lanes; lanes split the batch
    assert 1 <= cfg["data"]["num_workers"] <= lanes // world
    assert f"world {world} = " in layout and f"accumulation {g // (world * micro)}" in layout


def test_pinned_presets_run_at_larger_sizes_with_derived_lanes(capsys):
    for preset in PINNED:
        assert main([*_check_argv(preset, 64), "--set", "data.lanes=0"]) == 0, capsys.readouterr().err
        cfg = json.loads(capsys.readouterr().out.rsplit("}\n", 1)[0] + "}")
        assert cfg["data"]["lanes"] == 64 and cfg["batch"]["micro_batch_size"] == 1


def test_decode_workers_are_sized_to_the_node(capsys):
    """Workers per rank = cores per node / ranks per node - 1 (the rank's own process), at least 1; the
    paper presets derive them in --check (then lanes = W x workers must divide the batch, which may lower
    them); data.num_workers pins them; launch.cores_per_node 0 counts this machine's usable cores."""
    from shards.workers import usable_cores

    assert [data_workers(cores_per_node=c, ranks_per_node=r) for c, r in ((96, 8), (64, 8), (2, 1), (4, 8), (1, 1))] \
        == [11, 7, 1, 1, 1]

    def check(*sets, world=8, preset="i21k_vit_b16"):
        argv = _check_argv(preset, world) + [a for s in sets for a in ("--set", s)]
        assert main(argv) == 0, capsys.readouterr().err
        text, layout = capsys.readouterr().out.rsplit("}\n", 1)
        return json.loads(text + "}"), layout

    cfg, layout = check("launch.cores_per_node=40")  # 8 ranks, 4 workers each: lanes 32 divide 4096
    assert cfg["data"]["num_workers"] == 4 and cfg["data"]["lanes"] == 32 and "(40 cores per node)" in layout
    cfg, _ = check("launch.cores_per_node=96")  # 11 derived; 4096 / 8 ranks = 512 per rank takes 8
    assert cfg["data"]["num_workers"] == 8 and cfg["data"]["lanes"] == 64
    cfg, _ = check("launch.cores_per_node=96", "data.num_workers=2")  # pinned
    assert cfg["data"]["num_workers"] == 2 and cfg["data"]["lanes"] == 16
    cfg, _ = check(world=1, preset="pets_384_ft")  # this machine's cores, one rank
    assert cfg["launch"]["cores_per_node"] == usable_cores()
    assert cfg["data"]["num_workers"] == data_workers(cores_per_node=usable_cores(), ranks_per_node=1)
    assert main([*_check_argv("i21k_vit_b16", 8), "--set", "launch.cores_per_node=-1"]) == 2
    assert "launch.cores_per_node=-1 must be >= 0" in capsys.readouterr().err


def test_check_refuses_in_one_line(capsys):
    assert main(["pretrain", "--preset", "i21k_vit_b16", "--data", "d", "--out", "o", "--nproc", "3", "--check"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "batch.global_batch_size=4096 does not split over 3 ranks" in err


def test_no_ssh_per_node_form_names_the_whole_job(tmp_path):
    cfgs = [make_run_config("digits_tiny", data="d", out=str(tmp_path), run_id="r", nnodes=2, no_ssh=True,
                            node_rank=i, master_addr="10.0.0.1") for i in range(2)]
    assert all(c.launch.num_nodes == 2 and c.launch.world_size == 2 for c in cfgs)
    placed = node_hostfile(cfgs[1])
    assert Path(placed.launch.hostfile).read_text() == "node-0 slots=1\nnode-1 slots=1\n"
    argv = build_argv(placed.launch, "c.json")
    assert argv[argv.index("--hostfile") + 1] == placed.launch.hostfile
    assert {"--no_ssh", "--node_rank=1", "--master_addr=10.0.0.1"} <= set(argv) and "--launcher" not in argv


@pytest.mark.parametrize("flags, message", [
    (dict(no_ssh=True, node_rank=1, master_addr="h"), "--no-ssh without --hostfile needs --nnodes N"),
    (dict(nnodes=2), "--nnodes 2 needs the other nodes"),
    (dict(node_rank=1), "--node-rank is for one launcher per node"),
    (dict(no_ssh=True, nnodes=2, node_rank=2, master_addr="h"), "--node-rank 2 is outside the 2 nodes"),
    (dict(no_ssh=True, nnodes=2, master_addr="h"), "pass --node-rank I"),
    (dict(hostfile="/nonexistent/hostfile"), "hostfile /nonexistent/hostfile does not exist"),
])
def test_launch_shapes_that_would_be_another_job_are_refused(flags, message):
    with pytest.raises(ClusterError, match=message) as info:
        launch_overrides(**flags)
    assert isinstance(info.value, VitpipeError) and "\n" not in str(info.value)


def test_hostfile_slots_against_nproc(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("w0 slots=8\nw1 slots=4\n")
    with pytest.raises(ClusterError, match=r"host w1 has slots=4 but --nproc 8 .*raise its slots to 8 or pass --nproc 4"):
        launch_overrides(hostfile=str(hostfile), nproc=8)
    with pytest.raises(ClusterError, match=r"different slots per node \(\[4, 8\]\); pass --nproc N"):
        launch_overrides(hostfile=str(hostfile))
    with pytest.raises(ClusterError, match="--nnodes 3 but hostfile .* lists 2 nodes"):
        launch_overrides(hostfile=str(hostfile), nnodes=3, nproc=4)
    hostfile.write_text("w0 slots=8\nw1 slots=8\n")
    assert launch_overrides(hostfile=str(hostfile)) == [f"launch.hostfile={json.dumps(str(hostfile))}",
                                                        "launch.num_nodes=2", "launch.nproc_per_node=8"]


def test_cli_refuses_a_node_that_would_train_alone(tmp_path, capsys):
    code = main(["pretrain", "--preset", "digits_tiny", "--data", "d", "--out", str(tmp_path), "--run-id", "r",
                 "--no-ssh", "--node-rank", "1", "--master-addr", "127.0.0.1"])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "needs --nnodes N" in err
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_two_launchers_with_nnodes_and_no_hostfile_train_one_job(digits_shards, tmp_path):
    """The README's per-node form, `vitpipe pretrain --no-ssh --nnodes 2 --node-rank I --master-addr
    127.0.0.1` started twice: one 2-rank job (both ranks' shards in the checkpoint), not two 1-rank jobs.
    The run folder is local and shared by both "nodes", as on a shared file system."""
    port = free_port()
    out = tmp_path / "out"
    procs = []
    for i in range(2):
        argv = [str(Path(sys.executable).parent / "vitpipe"), "pretrain", "--preset", "digits_tiny",
                "--data", digits_shards, "--out", str(out), "--run-id", "pernode", "--steps", "6",
                "--no-ssh", "--nnodes", "2", "--node-rank", str(i), "--master-addr", "127.0.0.1",
                "--master-port", str(port), "--set", "checkpoint.every_steps=6", "--set", "launch.cpu_threads_per_rank=1"]
        log = open(tmp_path / f"node{i}.log", "wb")
        procs.append((subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"}), log))
    for proc, log in procs:
        proc.wait(timeout=360)
        log.close()
    logs = [(tmp_path / f"node{i}.log").read_text() for i in range(2)]
    assert [p.returncode for p, _ in procs] == [0, 0], "\n".join(t[-3000:] for t in logs)
    run = out / "runs" / "pernode"
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    names = os.listdir(run / "checkpoints" / "step00000006")
    assert any("zero_pp_rank_0" in n for n in names) and any("zero_pp_rank_1" in n for n in names)
    config = json.loads((run / "launch" / "config-node0.json").read_text())
    assert config["launch"]["num_nodes"] == 2 and config["launch"]["hostfile"].endswith("hostfile-node0")
