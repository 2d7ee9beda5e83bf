"""deploy/slurm/pretrain.sbatch on a real Slurm: a one-host cluster of 2 nodes (tests/slurm_cluster.py,
Debian's slurmctld + slurmd, installed by `make install`), the script submitted as a user would with
its settings in the environment, a digits pretraining of 2 tasks (1 rank per node) to the end."""
from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster

from pipeline.cli import build_parser
from pipeline.objectstore import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "slurm" / "pretrain.sbatch"


@pytest.fixture
def slurm(tmp_path):
    cluster = SlurmCluster(tmp_path / "slurm")
    try:
        yield cluster.start(free_port)
    finally:
        cluster.stop()


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_sbatch_pretrains_digits_on_two_nodes(slurm, digits_shards, tmp_path):
    out = tmp_path / "runs-root"
    env = {"PRESET": "digits_tiny", "DATA": digits_shards, "OUT": str(out), "NPROC": "1",
           "VITPIPE": str(Path(sys.executable).parent / "vitpipe"), "MASTER_PORT": str(free_port()),
           "EXTRA": "--steps 4 --set checkpoint.every_steps=4 --set launch.cpu_threads_per_rank=1"}
    job_log = tmp_path / "job.out"
    done = slurm.sbatch(str(SCRIPT), "--nodes=2", f"--partition={slurm.partition}", "--time=10",
                        f"--output={job_log}", f"--chdir={tmp_path}", env=env, timeout=540)
    log = job_log.read_text() if job_log.exists() else ""
    assert done.returncode == 0, f"{done.stdout}{done.stderr}\n{log[-4000:]}\n{slurm.logs()}"
    job_id = re.search(r"Submitted batch job (\d+)", done.stdout).group(1)
    assert "2 nodes x 1 ranks" in log
    run = out / "runs" / f"pretrain-slurm-{job_id}"  # the script's default run id
    assert json.loads((run / "run.json").read_text())["status"] == "complete"
    assert (run / "model.safetensors").exists() and (run / "model_config.json").exists()
    assert [line.split(",")[0] for line in (run / "metrics.csv").read_text().splitlines()[1:]] == ["1", "2", "3", "4"]
    names = os.listdir(run / "checkpoints" / "step00000004")  # both nodes' ranks wrote their shard
    assert any("zero_pp_rank_0" in n for n in names) and any("zero_pp_rank_1" in n for n in names)
    assert log.count("complete: 4 steps") == 1 and log.count("node 1: its ranks finished") == 1  # a launcher per node


def test_sbatch_asks_for_no_gpus_and_runs_one_launcher_per_node():
    """What srun's task runs is `vitpipe pretrain --no-ssh --nnodes N --node-rank I`: it parses, and
    nothing in the script requests GPUs or a fixed CPU count (those come from sbatch's options)."""
    text = SCRIPT.read_text()
    directives = re.findall(r"^#SBATCH (\S+)", text, re.M)
    assert "--ntasks-per-node=1" in directives
    assert not [d for d in directives if d.startswith(("--gpus", "--gres", "--cpus-per-task", "--partition"))]
    cmd = re.search(r"exec \$VITPIPE (pretrain .*?)'\n", text, re.S).group(1).replace("\\\n", " ")
    values = {"PRESET": "i21k_vit_b16", "DATA": "s3://b/d", "OUT": "s3://b/o", "RUN_ID": "r", "SLURM_JOB_NUM_NODES": "4",
              "NPROC": "8", "SLURM_NODEID": "3", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
              "STALL_TIMEOUT": "1800", "EXTRA": ""}
    argv = shlex.split(re.sub(r"\$\{?([A-Z_]+)\}?", lambda m: values[m.group(1)], cmd))
    args = build_parser().parse_args(argv)
    assert args.func.__name__ == "run_pretrain"
    assert (args.no_ssh, args.nnodes, args.nproc, args.node_rank, args.master_addr) == (True, 4, 8, 3, "10.0.0.1")
    assert args.hostfile is None
