"""One way through each stage: the CLI and the Prefect flow run the same stage function, so they
leave the same run folder (files, run.json schema), and `vitpipe artifacts get` works for both.

Issue 14's defects reproduced here: pretrain/finetune runs made by the CLI had no files.json
(`artifacts get` refused them); the finetune flow wrote no timm weights and no eval
report; the shard command and flow had different default shard sizes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline import flows, registry
from pipeline.cli import build_parser, main
from pipeline.objectstore import free_port
from pipeline.settings import DatasetParams, EvalParams, TrainParams
from shards import storage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]
STEPS = ["--steps", "2", "--nproc", "1", "--set", "checkpoint.every_steps=2", "--set", "launch.cpu_threads_per_rank=1"]
SETS = ["checkpoint.every_steps=2", "launch.cpu_threads_per_rank=1"]
PER_ATTEMPT = ("logs/", "tb/", "launch/")  # rank logs, TensorBoard event files (host + time in the name), launcher argv


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, str]:
    return {"cli": str(tmp_path_factory.mktemp("cli")), "flow": str(tmp_path_factory.mktemp("flow"))}


def _files(run_url: str) -> set[str]:
    return {k for k in registry.read_file_index(run_url) if not k.startswith(PER_ATTEMPT)}


def _schema(meta: dict) -> dict:
    return {k: sorted(v) if isinstance(v, dict) else type(v).__name__ for k, v in meta.items()}


def _same_run_folder(cli_url: str, flow_url: str, tmp_path: Path) -> None:
    cli, flow = registry.read_run(cli_url), registry.read_run(flow_url)
    assert cli.complete and flow.complete
    assert _files(cli_url) == _files(flow_url)
    assert _schema(storage.read_json(storage.join(cli_url, "run.json"))) == _schema(
        storage.read_json(storage.join(flow_url, "run.json")))
    for name, url in (("cli", cli_url), ("flow", flow_url)):
        assert main(["artifacts", "get", url, str(tmp_path / name)]) == 0
        assert (tmp_path / name / "files.json").exists() or (tmp_path / name / "run.json").exists()


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_shard_defaults_are_one_set(tmp_path):
    args = build_parser().parse_args(["shard", "src", str(tmp_path)])
    assert args.shard_size == DatasetParams.model_fields["shard_size"].default == 10_000


@pytest.mark.parametrize("window", [None, 400])
def test_shard_cli_and_flow_write_the_same_dataset(prefect_api, digits_tree, tmp_path, capsys, window):
    cli, flow = tmp_path / "cli", tmp_path / "flow"
    windowed = ["--window", str(window)] if window else []
    assert main(["shard", str(digits_tree), str(cli), "--shard-size", "200", "--workers", "2", *windowed]) == 0
    manifest = flows.shard_dataset(DatasetParams(source=str(digits_tree), url=str(flow), shard_size=200, window=window))
    assert not manifest["skipped_stage"]
    assert sorted(os.listdir(cli)) == sorted(os.listdir(flow))
    a, b = (storage.read_json(str(d / "manifest.json")) for d in (cli, flow))
    assert sorted(a) == sorted(b) and a["shards"] == b["shards"] and a["settings"] == b["settings"]
    assert a["settings"].get("window") == window
    capsys.readouterr()
    assert main(["shard", str(digits_tree), str(flow), "--shard-size", "200", *windowed]) == 0  # the flow's: skipped
    assert "nothing to do" in capsys.readouterr().out


@pytest.fixture(scope="module")
def pretrained(prefect_api, digits_shards, roots):
    import io
    from contextlib import redirect_stdout

    with redirect_stdout(io.StringIO()):
        assert main(["pretrain", "--preset", "digits_tiny", "--data", digits_shards, "--out", roots["cli"],
                     "--master-port", str(free_port()), *STEPS]) == 0
    cli = registry.latest(roots["cli"], "pretrain").url
    out = flows.pretrain(TrainParams(preset="digits_tiny", steps=2, nproc_per_node=1, master_port=free_port(), set=SETS),
                         roots["flow"], digits_shards)
    return {"cli": cli, "flow": out["run_url"]}


def test_pretrain_cli_and_flow_leave_the_same_run_folder(pretrained, tmp_path):
    _same_run_folder(pretrained["cli"], pretrained["flow"], tmp_path)
    assert {"model.safetensors", "model_config.json", "config.json", "inputs.json", "metrics.csv"} <= _files(pretrained["cli"])


def test_pretrain_cli_skips_a_complete_run_with_the_same_inputs(pretrained, digits_shards, roots, capsys):
    assert main(["pretrain", "--preset", "digits_tiny", "--data", digits_shards, "--out", roots["cli"],
                 "--master-port", str(free_port()), *STEPS]) == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out and registry.read_run(pretrained["cli"]).run_id in out


@pytest.fixture(scope="module")
def finetuned(pretrained, digits_shards, roots):
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["finetune", "--preset", "digits_tiny_ft", "--pretrained", pretrained["cli"], "--data", digits_shards,
                     "--val-data", digits_shards, "--out", roots["cli"], "--master-port", str(free_port()), *STEPS]) == 0
    cli = _last_json(buf.getvalue())
    flow = flows.finetune(TrainParams(preset="digits_tiny_ft", steps=2, nproc_per_node=1, master_port=free_port(), set=SETS),
                          roots["flow"], digits_shards, pretrained["flow"], digits_shards)
    return {"cli": cli["run_url"], "flow": flow["run_url"], "line": cli}


def test_finetune_cli_and_flow_leave_the_same_run_folder(finetuned, tmp_path):
    _same_run_folder(finetuned["cli"], finetuned["flow"], tmp_path)
    for url in (finetuned["cli"], finetuned["flow"]):  # complete only after the evaluation and the timm export
        assert {"timm/model.safetensors", "timm/config.json", "report/eval.json", "report/confusion.csv"} <= _files(url)
        assert "top1" in registry.read_run(url).metrics
    assert finetuned["line"]["top1"] == registry.read_run(finetuned["cli"]).metrics["top1"]


def test_evaluate_cli_and_flow_leave_the_same_run_folder(finetuned, digits_shards, roots, tmp_path, capsys):
    assert main(["evaluate", finetuned["cli"], "--data", digits_shards, "--root", roots["cli"]]) == 0
    cli = _last_json(capsys.readouterr().out)
    flow = flows.evaluate(EvalParams(), roots["flow"], digits_shards, finetuned["flow"])
    _same_run_folder(cli["run_url"], flow["run_url"], tmp_path)
    assert "report/model/report.html" in _files(cli["run_url"])
