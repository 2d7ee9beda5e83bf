"""pipeline.registry and `vitpipe artifacts ls|get`: runs on local disk and on a real SeaweedFS."""
from __future__ import annotations

import json
import os
import time

import pytest

from pipeline import registry
from pipeline.cli import main
from shards import storage
from vit.runs import RunFolder


def make_run(root: str, run_id: str, *, kind: str, complete: bool, parent: str | None = None, top1: float | None = None,
             files: dict[str, bytes] | None = None) -> RunFolder:
    folder = RunFolder.create(root, run_id)
    folder.start(kind=kind, parent=parent, lineage={"dataset_url": "s3://b/data", "manifest_sha256": "ab" * 32})
    for name, data in (files or {"model.safetensors": b"weights " + run_id.encode(), "metrics.csv": b"step,loss\n1,2.0\n"}).items():
        storage.write_bytes(folder.file(name), data)
    if complete:
        registry.write_file_index(folder.url)
        folder.finish(metrics={"top1": top1} if top1 is not None else {})
    return folder


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    s3 = request.getfixturevalue("s3")
    return s3.url(f"registry-{os.getpid()}-{time.time_ns()}")


def test_list_latest_and_incomplete_runs(root):
    assert registry.list_runs(root) == []
    make_run(root, "pretrain-20260101-000000-aaaaaa", kind="pretrain", complete=True)
    make_run(root, "pretrain-20260102-000000-bbbbbb", kind="pretrain", complete=True)
    time.sleep(1.1)  # `created` has one-second resolution
    make_run(root, "pretrain-20260103-000000-cccccc", kind="pretrain", complete=False)  # newest, but running
    make_run(root, "finetune-20260104-000000-dddddd", kind="finetune", complete=True,
             parent="pretrain-20260102-000000-bbbbbb", top1=0.875)

    runs = registry.list_runs(root)
    assert [r.run_id for r in runs][-2:] == ["pretrain-20260103-000000-cccccc", "finetune-20260104-000000-dddddd"]
    assert {r.run_id: r.status for r in runs}["pretrain-20260103-000000-cccccc"] == "running"
    # the newest complete pretrain run, never the running one
    assert registry.latest(root, "pretrain").run_id == "pretrain-20260102-000000-bbbbbb"
    assert registry.resolve("latest:finetune", root=root).parent == "pretrain-20260102-000000-bbbbbb"
    with pytest.raises(registry.RegistryError, match="no complete evaluate run"):
        registry.latest(root, "evaluate")


def test_get_checks_sha256_and_single_file(root, tmp_path):
    run = make_run(root, "finetune-20260105-000000-eeeeee", kind="finetune", complete=True, top1=0.5,
                   files={"model.safetensors": b"w" * 1000, "checkpoints/step1/state.pt": b"s" * 10, "report/eval.json": b"{}"})
    dest = tmp_path / "dl"
    paths = registry.get_run("finetune-20260105-000000-eeeeee", str(dest), root=root)
    assert sorted(os.path.relpath(p, dest) for p in paths) == sorted(
        ["model.safetensors", os.path.join("checkpoints", "step1", "state.pt"), os.path.join("report", "eval.json"), "run.json"])
    assert (dest / "model.safetensors").read_bytes() == b"w" * 1000
    assert json.loads((dest / "run.json").read_text())["status"] == "complete"

    one = registry.get_run(run.url, str(tmp_path / "one"), file="model.safetensors")
    assert [os.path.basename(p) for p in one] == ["model.safetensors"]
    with pytest.raises(registry.RegistryError, match="no file 'nope.bin'"):
        registry.get_run(run.url, str(tmp_path / "x"), file="nope.bin")

    # a stored file changed after completion: the download is refused and removed
    storage.write_bytes(run.file("model.safetensors"), b"tampered")
    with pytest.raises(registry.RegistryError, match="sha256 mismatch"):
        registry.get_run(run.url, str(tmp_path / "bad"), file="model.safetensors")
    assert not (tmp_path / "bad" / "model.safetensors").exists()


def test_incomplete_run_cannot_be_downloaded(root, tmp_path):
    run = make_run(root, "pretrain-20260106-000000-ffffff", kind="pretrain", complete=False)
    with pytest.raises(registry.RegistryError, match="never completed"):
        registry.get_run(run.url, str(tmp_path / "dl"))
    with pytest.raises(registry.RegistryError, match="needs --root"):
        registry.resolve("pretrain-20260106-000000-ffffff")


def test_cli_ls_and_get(root, tmp_path, capsys):
    make_run(root, "pretrain-20260107-000000-aaaaaa", kind="pretrain", complete=True)
    make_run(root, "finetune-20260107-000001-bbbbbb", kind="finetune", complete=True,
             parent="pretrain-20260107-000000-aaaaaa", top1=0.9375)
    make_run(root, "finetune-20260107-000002-cccccc", kind="finetune", complete=False)
    assert main(["artifacts", "ls", root]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["RUN", "KIND", "STATUS", "CREATED", "METRIC", "PARENT"]
    row = next(line for line in out if line.startswith("finetune-20260107-000001-bbbbbb"))
    assert "top1=0.9375" in row and row.rstrip().endswith("pretrain-20260107-000000-aaaaaa") and " complete " in row
    assert "running (incomplete)" in next(line for line in out if line.startswith("finetune-20260107-000002-cccccc"))

    assert main(["artifacts", "ls", root, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["run_id"]: r["lineage"]["manifest_sha256"] for r in rows}["pretrain-20260107-000000-aaaaaa"] == "ab" * 32

    dest = tmp_path / "latest"
    assert main(["artifacts", "get", "latest:finetune", str(dest), "--root", root, "--file", "model.safetensors"]) == 0
    assert (dest / "model.safetensors").read_bytes() == b"weights finetune-20260107-000001-bbbbbb"
    assert "sha256 checked" in capsys.readouterr().out

    assert main(["artifacts", "get", "latest:evaluate", str(dest), "--root", root]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no complete evaluate run" in err
