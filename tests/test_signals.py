"""SIGINT / SIGTERM stop every command promptly: real `vitpipe` subprocesses, real signals to the process group.

Issue 14's defects: Ctrl-C during `vitpipe shard` at 10 of 120 shards published 109 more, then a
KeyboardInterrupt traceback; `vitpipe serve` ignored SIGTERM once its Prefect server was gone.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shards.digits import write_digits_tree

ROOT = Path(__file__).resolve().parents[1]
VITPIPE = [sys.executable, "-m", "pipeline.cli"]


def _start(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(VITPIPE + args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def _wait_for(predicate, *, timeout: float, proc: subprocess.Popen, log: Path, what: str, poll: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"{what}: exited {proc.returncode} first:\n{log.read_text()[-3000:]}")
        time.sleep(poll)
    raise AssertionError(f"{what}: not within {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_digits_tree(tmp_path_factory.mktemp("sig") / "tree", size=96)  # 1,797 images -> 120 shards of 15


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_shard_stops_within_a_few_shards_and_resumes(tree, tmp_path, sig):
    out, log = tmp_path / "out", tmp_path / "shard.log"
    args = ["shard", str(tree), str(out), "--shard-size", "15", "--workers", "2", "--resize", "64"]
    proc = _start(args, log)
    tars = lambda: len(list(out.glob("*.tar"))) if out.exists() else 0  # noqa: E731
    _wait_for(lambda: tars() >= 10, timeout=120, proc=proc, log=log, what="10 shards")
    os.killpg(proc.pid, sig)
    at_signal = tars()
    proc.wait(30)
    text = log.read_text()
    assert proc.returncode == 128 + sig, text[-2000:]
    published = tars()
    assert published <= at_signal + 6, (at_signal, published)  # at most the shards in flight (2 workers) finish
    assert not (out / "manifest.json").exists()
    assert not list(out.glob(".*.partial"))  # no staging file left
    last = text.strip().splitlines()[-1]
    assert last.startswith(f"vitpipe shard: stopped by {signal.Signals(sig).name}; kept ") and "re-run" in last
    assert "Traceback" not in text
    again = subprocess.run(VITPIPE + args, cwd=ROOT, capture_output=True, text=True, timeout=240,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(list(out.glob("*.tar"))) == 120 and (out / "manifest.json").exists()


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_pretrain_stops_its_ranks_on_sigterm_and_says_what_it_kept(tmp_path):
    import json

    from pipeline.objectstore import free_port
    from shards import shard_dataset

    data, out, log = tmp_path / "data", tmp_path / "runs", tmp_path / "pretrain.log"
    shard_dataset(str(write_digits_tree(tmp_path / "tree", size=16)), str(data), name="digits", shard_size=200)
    proc = _start(["pretrain", "--preset", "digits_tiny", "--data", str(data), "--out", str(out), "--run-id", "sig",
                   "--steps", "2000", "--nproc", "1", "--master-port", str(free_port()),
                   "--set", "checkpoint.every_steps=2", "--set", "log_every=1", "--set", "launch.cpu_threads_per_rank=1"], log)
    status = out / "runs" / "sig" / "logs" / "node0" / "status-rank0.jsonl"
    steps = lambda: ([r for r in map(json.loads, status.read_text().splitlines()) if r["event"] == "step"]  # noqa: E731
                     if status.exists() else [])
    _wait_for(lambda: len(steps()) >= 4, timeout=300, proc=proc, log=log, what="4 steps", poll=0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(40)
    text = log.read_text()
    assert proc.returncode == 143, text[-2000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith("vitpipe pretrain: stopped by SIGTERM; kept ") and "checkpoints up to step" in last, last
    assert "re-run the same command to resume" in last and "Traceback" not in text
    # progress from rank 0's status records: the log folder once, then step, loss, img/s (ETA once two are seen)
    assert text.count(f"sig: 1 rank(s); logs in {status.parent}") == 1
    assert re.search(r"sig: step \d+/2000 loss \d+\.\d+ img/s \d+\.\d", text), text[-2000:]
    meta = json.loads((out / "runs" / "sig" / "run.json").read_text())
    assert meta["status"] == "failed" and (out / "runs" / "sig" / "checkpoints" / "latest").exists()
    time.sleep(2)
    n = len(steps())
    time.sleep(3)
    assert len(steps()) == n and n < 2000  # no rank is still training


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_serve_exits_on_sigterm_when_its_prefect_server_is_gone(tmp_path):
    """A real `prefect server`, `vitpipe serve` registered with it; the server is killed, then SIGTERM."""
    import urllib.request

    from pipeline.objectstore import free_port

    port = free_port()
    env = {"PREFECT_HOME": str(tmp_path / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "VITPIPE_ROOT": str(tmp_path / "root"), "VITPIPE_SOURCE": str(tmp_path / "src"),
           "VITPIPE_FT_SOURCE": str(tmp_path / "ft"), "VITPIPE_EVAL_SOURCE": str(tmp_path / "ev"),
           "VITPIPE_HOSTFILE": str(tmp_path / "hosts")}
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    with open(server_log, "wb") as fh:
        server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], env={**os.environ, **env}, stdout=fh, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    serve = None
    try:
        def healthy() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2).status == 200
            except OSError:
                return False

        _wait_for(healthy, timeout=120, proc=server, log=server_log, what="prefect server", poll=0.5)
        serve = _start(["serve", "--only", "shard-nightly"], serve_log, env)
        _wait_for(lambda: "serving 1 deployment" in serve_log.read_text(), timeout=120, proc=serve, log=serve_log,
                  what="vitpipe serve", poll=0.5)
        time.sleep(3)  # the runner polls the server
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)
        time.sleep(5)  # the runner retries its calls to the missing server
        t0 = time.monotonic()
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(15)
        took = time.monotonic() - t0
        assert took < 10 and serve.returncode == 143, (took, serve.returncode, serve_log.read_text()[-2000:])
        assert "vitpipe serve: stopped by SIGTERM" in serve_log.read_text()
    finally:
        for proc in (serve, server):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
