"""pipeline.console and the CLI's global flags: --version, --log-level, --quiet; progress bars of
`vitpipe evaluate` and `vitpipe artifacts get` on stderr (stdout keeps the machine-readable line)."""
from __future__ import annotations

import json
import logging

import pytest

import vit
from pipeline.cli import main
from vit.checkpoint import save_model
from vit.runs import RunFolder


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == "vitpipe 0.1.0"


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "m"
    torch_model = vit.create_model("vit_tiny_patch16", num_classes=10, img_size=16, patch_size=4, embed_dim=32,
                                   depth=1, num_heads=2, mlp_dim=64)
    save_model(torch_model, str(path))
    return str(path)


def test_evaluate_shows_progress_on_stderr_unless_quiet(digits_shards, digits_model, capsys):
    assert main(["evaluate", digits_model, "--data", digits_shards, "--batch-size", "256"]) == 0
    out, err = capsys.readouterr()
    assert "evaluate: 100%" in err and "1797/1797" in err
    assert "top1" in json.loads(out)  # stdout: the one metrics line
    assert main(["--quiet", "evaluate", digits_model, "--data", digits_shards, "--batch-size", "256"]) == 0
    out, err = capsys.readouterr()
    assert "evaluate" not in err and len(out.strip().splitlines()) == 1


def test_artifacts_get_progress_and_log_level(tmp_path, digits_model, capsys, caplog):
    from pipeline.registry import write_file_index

    run = RunFolder.create(str(tmp_path / "root"), "finetune-20261201-000000-aaaaaa")
    run.start(kind="finetune")
    save_model(vit.checkpoint.load_model(digits_model), run.url)
    write_file_index(run.url)
    run.finish(status="complete")
    with caplog.at_level(logging.DEBUG, logger="vitpipe"):
        assert main(["--log-level", "debug", "artifacts", "get", run.url, str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "get finetune-20261201-000000-aaaaaa: 100%" in err
    assert any(r.name == "vitpipe" and "vitpipe artifacts" in r.getMessage() for r in caplog.records)
    assert main(["--quiet", "artifacts", "get", run.url, str(tmp_path / "b")]) == 0
    assert "100%" not in capsys.readouterr().err
    assert (tmp_path / "b" / "model.safetensors").exists()
