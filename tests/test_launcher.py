"""pipeline.launcher / vitpipe pretrain: argv for every launch mode, errors before any rank starts,
failed-rank diagnosis, and the deploy files starting exactly `vitpipe pretrain`.

Real launches (ranks, faults, resume, multi-node, stall) are in tests/test_train_dist.py; pdsh and
Slurm cannot run here, so for them only the argv is checked.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import build_parser
from pipeline.launcher import (
    LaunchError,
    build_argv,
    diagnose,
    hostfile_nodes,
    make_run_config,
    preflight,
)
from vit.config import ConfigError, LaunchConfig

ROOT = Path(__file__).resolve().parent.parent


def test_argv_single_node():
    argv = build_argv(LaunchConfig(nproc_per_node=2, master_port=29555), "/tmp/c.json", rank_log_dir="/tmp/logs")
    assert argv[:4] == [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    assert argv[argv.index("--num_gpus") + 1] == "2" and argv[argv.index("--num_nodes") + 1] == "1"
    assert "--master_port=29555" in argv and "--enable_each_rank_log=/tmp/logs" in argv
    assert argv[-4:] == ["--module", "vit.train", "--config", "/tmp/c.json"]
    assert "--no_ssh" not in argv and "--hostfile" not in argv


@pytest.mark.parametrize("launcher", ["pdsh", "openmpi", "slurm"])
def test_argv_hostfile_with_multinode_launcher(launcher):
    lc = LaunchConfig(nproc_per_node=8, num_nodes=4, hostfile="/etc/hosts.ds", launcher=launcher, master_addr="w0")
    argv = build_argv(lc, "/c.json")
    assert argv[argv.index("--hostfile") + 1] == "/etc/hosts.ds"
    assert argv[argv.index("--launcher") + 1] == launcher
    assert "--master_addr=w0" in argv and "--no_ssh" not in argv
    assert argv.index("--launcher") < argv.index("--module")  # launcher options come before the script


def test_argv_no_ssh_per_node():
    lc = LaunchConfig(nproc_per_node=8, num_nodes=2, hostfile="h", no_ssh=True, node_rank=1, master_addr="10.0.0.1")
    argv = build_argv(lc, "/c.json")
    assert {"--no_ssh", "--node_rank=1", "--master_addr=10.0.0.1"} <= set(argv)
    assert "--launcher" not in argv  # one launcher per node: nothing to fan out


def test_bind_cores_option():
    assert "--bind_cores_to_rank" in build_argv(LaunchConfig(bind_cores_to_rank=True), "c")


def test_hostfile_parsing_and_errors(tmp_path):
    good = tmp_path / "h"
    good.write_text("# two nodes\nw0 slots=8\nw1 slots=4  # comment\n\n")
    assert hostfile_nodes(str(good)) == [("w0", 8), ("w1", 4)]
    bad = tmp_path / "bad"
    bad.write_text("w0 gpus=8\n")
    with pytest.raises(ConfigError, match=r"bad:1: expected 'HOST slots=N'"):
        hostfile_nodes(str(bad))


def test_make_run_config_from_cli_knobs(tmp_path, digits_shards):
    h = tmp_path / "h"
    h.write_text("a slots=1\nb slots=1\n")
    cfg = make_run_config("digits_tiny", data=digits_shards, out=str(tmp_path), run_id="r1", steps=5, hostfile=str(h),
                          no_ssh=True, node_rank=1, master_addr="127.0.0.1", sets=["optim.lr=0.01"])
    assert cfg.run_url == str(tmp_path / "runs" / "r1") and cfg.run_id == "r1"
    assert cfg.launch.num_nodes == 2 and cfg.launch.node_rank == 1 and cfg.launch.world_size == 2
    assert cfg.schedule.total_steps == 5 and cfg.schedule.warmup_steps < 5 and cfg.optim.lr == 0.01
    with pytest.raises(ConfigError, match="pass the same --run-id to every node"):
        make_run_config("digits_tiny", data=digits_shards, out=str(tmp_path), no_ssh=True, node_rank=0,
                        master_addr="x")
    auto = make_run_config("digits_tiny", data=digits_shards, out=str(tmp_path))
    assert re.fullmatch(r"pretrain-\d{8}-\d{6}-[0-9a-f]{6}", auto.run_id)


def test_preflight_errors_before_any_rank_starts(tmp_path, digits_shards):
    with pytest.raises(Exception, match="manifest"):
        preflight(make_run_config("digits_tiny", data=str(tmp_path / "nodata"), out=str(tmp_path)))
    with pytest.raises(ConfigError, match="holds no checkpoint to resume from"):
        preflight(make_run_config("digits_tiny", data=digits_shards, out=str(tmp_path),
                                  sets=['checkpoint.resume="must"']))
    with pytest.raises(ConfigError, match="data: .*lanes"):  # the stream's own check (9 shards < 16 lanes), before launching
        preflight(make_run_config("digits_tiny", data=digits_shards, out=str(tmp_path), sets=["data.lanes=16"]))
    with pytest.raises(ConfigError, match="init_from=.* does not exist"):
        preflight(make_run_config("digits_tiny_ft", data=digits_shards, out=str(tmp_path),
                                  init_from=str(tmp_path / "missing")))


def test_cli_reports_config_errors_in_one_line(tmp_path, digits_shards, capsys):
    from pipeline.cli import main

    assert main(["pretrain", "--preset", "digits_tiny", "--data", digits_shards, "--out", str(tmp_path), "--nproc", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitpipe pretrain: error:") and "does not split over 3 ranks" in err and "\n" not in err
    assert main(["pretrain", "--preset", "nope", "--data", digits_shards, "--out", str(tmp_path)]) == 2
    assert "known presets" in capsys.readouterr().err


def test_debug_flag_and_env_print_the_traceback(tmp_path, digits_shards, capsys, monkeypatch):
    from pipeline.cli import main

    argv = ["pretrain", "--preset", "nope", "--data", digits_shards, "--out", str(tmp_path)]
    assert main(["--debug", *argv]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    monkeypatch.setenv("VITPIPE_DEBUG", "1")
    assert main(argv) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    monkeypatch.delenv("VITPIPE_DEBUG")
    assert main(argv) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_pretrain_on_a_folder_without_manifest_is_one_line(tmp_path, capsys):
    """Was a 28-line traceback (DatasetError was missing from the lists of class names)."""
    from pipeline.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["pretrain", "--preset", "digits_tiny", "--data", str(tmp_path / "empty"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "manifest.json" in err and str(tmp_path / "empty") in err, err
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_no_exception_is_classified_by_its_class_name():
    import re

    root = Path(__file__).resolve().parent.parent
    for path in list((root / "pipeline").glob("*.py")) + list((root / "vit").glob("*.py")):
        text = path.read_text()
        assert not re.search(r"__name__\s+(not\s+)?in\b|__name__\s*==\s*[\"']\w+Error", text), path
        assert "EXPECTED_ERRORS" not in text, path


def test_every_error_class_derives_from_vitpipe_error():
    from pipeline.models import FinetuneError
    from pipeline.cmd_flows import DeploymentFileError
    from pipeline.settings import ConfigFileError
    from pipeline.stages import StageError
    from pipeline.launcher import LaunchError
    from pipeline.objectstore import ObjectStoreError
    from pipeline.registry import RegistryError
    from shards.errors import JobFailed, VitpipeError
    from vit.config import ConfigError
    from vit.report import ReportError

    for cls in (FinetuneError, DeploymentFileError, ConfigFileError, ConfigError, RegistryError, ReportError):
        assert issubclass(cls, VitpipeError) and cls.exit_code == 2, cls
    for cls in (StageError, LaunchError, ObjectStoreError):
        assert issubclass(cls, JobFailed) and cls.exit_code == 1, cls
    assert LaunchError.transient and not ConfigError.transient


def test_diagnose_names_the_rank_that_died_from_status_files(tmp_path):
    """The failed rank comes from the ranks' status records, not from their log text."""
    from vit.status import StatusWriter, status_path

    launcher = tmp_path / "launcher.log"
    launcher.write_text("launcher output\n")
    for r in range(3):
        (tmp_path / f"x_rank{r}.log").write_text("free text the launcher does not read\n")
        StatusWriter(status_path(str(tmp_path), r)).write("started", rank=r)
    StatusWriter(status_path(str(tmp_path), 0)).write("terminated", signal=15)
    StatusWriter(status_path(str(tmp_path), 2)).write("terminated", signal=15)
    err = diagnose(str(launcher), str(tmp_path), -9)  # rank 1: no end record (killed, e.g. by the OOM killer)
    assert isinstance(err, LaunchError) and err.rank == 1 and err.rank_exit_code == -9 and err.transient
    assert err.log_path == str(tmp_path / "x_rank1.log")
    StatusWriter(status_path(str(tmp_path), 2)).write("failed", error="data: 9 of 10 samples unreadable", exit_code=1,
                                                       transient=False)
    err = diagnose(str(launcher), str(tmp_path), 1)  # a rank that says it failed wins, with its reason
    assert err.rank == 2 and not err.transient and str(err).startswith("rank 2 failed with exit code 1: data: 9 of 10")


def _pretrain_args(argv: list[str]):
    args = build_parser().parse_args(argv)
    assert args.command == "pretrain" and args.func.__name__ == "run_pretrain"
    return args


def test_k8s_manifest_runs_vitpipe_pretrain_per_node():
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / "train-node.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "Job")
    assert job["spec"]["completionMode"] == "Indexed"
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["vitpipe"]
    args = _pretrain_args([a.replace("$(JOB_COMPLETION_INDEX)", "2") for a in container["args"]])
    assert args.no_ssh and args.node_rank == 2 and args.run_id and args.hostfile
    hosts = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["hostfile"].split("\n")
    assert len([h for h in hosts if h.strip()]) == job["spec"]["completions"]


def test_hostfile_example_parses():
    assert len(hostfile_nodes(str(ROOT / "deploy" / "hostfile.example"))) == 4


def test_run_folder_status_lifecycle(tmp_path):
    from vit.runs import RunFolder, new_run_id

    run = RunFolder.create(str(tmp_path), new_run_id("pretrain"))
    first = run.start(kind="pretrain", parent=None, lineage={"dataset_url": "d"})
    assert first["status"] == "running" and first["lineage"]["dataset_url"] == "d" and first["lineage"]["code_version"]
    assert run.finish(status="failed", metrics={"error": "rank 1 failed"})["status"] == "failed"
    again = run.start(kind="pretrain")  # a resumed attempt keeps the creation time
    assert again["status"] == "running" and again["created"] == first["created"]
    done = run.finish(metrics={"final_loss": 0.5})
    assert done["status"] == "complete" and done["finished"] and done["metrics"] == {"final_loss": 0.5}
    assert run.latest_checkpoint() is None
    with pytest.raises(ValueError, match="not one of"):
        new_run_id("train")
