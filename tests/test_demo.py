"""`vitpipe demo`: its parts (object store lifecycle, data, config, printed commands).

The flow the demo runs, vit_pipeline, is run end to end in tests/test_flows.py (real Prefect,
SeaweedFS and DeepSpeed ranks); running the whole demo again here would double the suite's
longest test, so this file checks what the demo adds around it.
"""
from __future__ import annotations

import math
import os
import shlex
import stat

import pytest

from pipeline import demo
from pipeline.cli import build_parser
from pipeline.objectstore import pid_alive
from vit.presets import get_preset


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    return demo.write_trees(tmp_path_factory.mktemp("demo") / "data")


def _files(root) -> set[str]:
    return {p.name for p in root.rglob("*.png")}


def test_trees_use_a_different_label_set_for_finetuning(trees):
    assert sorted(p.name for p in trees["pretrain"].iterdir()) == list(demo.PRETRAIN_CLASSES)
    assert sorted(p.name for p in trees["finetune"].iterdir()) == list(demo.FINETUNE_CLASSES)
    assert sorted(p.name for p in trees["eval"].iterdir()) == list(demo.FINETUNE_CLASSES)
    assert not _files(trees["finetune"]) & _files(trees["eval"])  # held-out evaluation images
    assert len(_files(trees["eval"])) > 100 and len(_files(trees["pretrain"])) > 500


def test_demo_config_is_valid_and_fits_the_presets(trees):
    settings = demo.DemoSettings(workdir="/tmp/x")
    cfg = demo.demo_config(settings, trees)
    assert cfg.root.startswith("s3://") and all(d.url.startswith(cfg.root) for d in (cfg.pretrain_data, cfg.finetune_data, cfg.eval_data))
    pre, ft = get_preset(cfg.pretrain.preset), get_preset(cfg.finetune.preset)
    assert cfg.pretrain.nproc_per_node == 2  # two DeepSpeed ranks
    assert ft.model.img_size > pre.model.img_size  # fine-tuning at a higher resolution
    # every lane of the training stream gets its own shard (vit.data refuses fewer shards than lanes)
    for data, preset in ((cfg.pretrain_data, pre), (cfg.finetune_data, ft)):
        shards = math.ceil(len(_files(trees[data.name.split("-")[1]])) / data.shard_size)
        assert shards >= preset.data.lanes, data.name
    with pytest.raises(ValueError, match="--nproc 0"):
        demo.DemoSettings(nproc=0)


def test_printed_retrieval_commands_parse(tmp_path):
    result = {"runs": {"evaluate": "evaluate-20260101-000000-abcdef"},
              "urls": {"pretrain": "s3://vitpipe-demo/runs/pretrain-20260101-000000-abcdef"}}
    parser = build_parser()
    commands = demo.retrieval_commands(result, root="s3://vitpipe-demo", workdir=str(tmp_path))
    assert len(commands) == 4
    for cmd in commands:
        prefix = f"env $(cat {demo.env_file(tmp_path)}) "
        assert cmd.startswith(prefix)
        exe, *argv = shlex.split(cmd[len(prefix):])
        assert exe == "vitpipe" or os.access(exe, os.X_OK)
        args = parser.parse_args(argv)
        assert args.func.__module__ == "pipeline.cmd_artifacts"


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_object_store_is_started_once_reused_and_stopped(tmp_path, capsys):
    env = demo.ensure_store(tmp_path)
    try:
        state = demo._state_path(tmp_path)
        pid = __import__("json").loads(state.read_text())["pid"]
        assert pid_alive(pid)
        env_path = demo.env_file(tmp_path)
        assert stat.S_IMODE(os.stat(env_path).st_mode) == 0o600
        assert f"AWS_ENDPOINT_URL={env['AWS_ENDPOINT_URL']}" in env_path.read_text()
        assert demo.ensure_store(tmp_path) == env  # a second demo reuses the running store
        assert env["AWS_SECRET_ACCESS_KEY"] not in capsys.readouterr().out  # nothing prints the secret
    finally:
        assert demo.stop_store(tmp_path)
    assert not pid_alive(pid)
    assert not demo.stop_store(tmp_path)
