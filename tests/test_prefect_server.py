"""Scheduled deployments on a real Prefect server: `prefect server start` (SQLite under a tmp
PREFECT_HOME, free port), `vitpipe serve` registers deploy/prefect.yaml's deployments with their
cron schedules, one is triggered (a small shard_dataset) and completes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.objectstore import free_port
from shards import storage

ROOT = Path(__file__).resolve().parents[1]


def _wait(predicate, *, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        for proc, log in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{what}: process exited with {proc.returncode}:\n{Path(log).read_text()[-3000:]}")
        try:
            value = predicate()
            if value:
                return value
        except Exception as err:  # not up yet
            last = err
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout:.0f}s (last error: {last!r})")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture
def prefect_server(tmp_path):
    port = free_port()
    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                                 "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/api"
        _wait(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200, timeout=120,
              what="prefect server /api/health", procs=[(proc, log)])
        assert (home / "prefect.db").exists() or any(home.rglob("*.db"))  # SQLite under our PREFECT_HOME
        yield {"url": url, "env": env}
    finally:
        _stop(proc)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_serve_registers_scheduled_deployments_and_runs_one(prefect_server, digits_tree, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import DeploymentSort
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    out_root = tmp_path / "store"
    env = {**prefect_server["env"], "VITPIPE_ROOT": str(out_root), "VITPIPE_SOURCE": str(digits_tree),
           "VITPIPE_HOSTFILE": "", "VITPIPE_FT_SOURCE": str(digits_tree), "VITPIPE_EVAL_SOURCE": str(digits_tree),
           "VITPIPE_DASK_ADDRESS": ""}
    log = tmp_path / "serve.log"
    with open(log, "wb") as fh:
        serve = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--file", str(ROOT / "deploy" / "prefect.yaml")],
                                 env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with temporary_settings(updates={PREFECT_API_URL: prefect_server["url"]}):
            def registered():
                with get_client(sync_client=True) as client:
                    deps = client.read_deployments(sort=DeploymentSort.NAME_ASC, limit=50)
                return deps if len(deps) == 4 else None

            deps = _wait(registered, timeout=120, what="vitpipe serve registering 4 deployments", procs=[(serve, log)])
            crons = {d.name: [s.schedule.cron for s in d.schedules] for d in deps}
            assert crons == {"shard-nightly": ["30 1 * * *"], "pretrain-weekly": ["0 3 * * 6"],
                             "finetune-daily": ["0 6 * * *"], "pipeline-weekly": ["0 2 * * 0"]}
            assert all(s.active for d in deps for s in d.schedules)

            # trigger the cheap one, with a smaller shard size than the schedule's
            params = {"params": {"source": str(digits_tree), "url": str(out_root / "datasets" / "pretrain"),
                                 "name": "corpus", "shard_size": 500}}
            run = run_deployment("shard_dataset/shard-nightly", parameters=params, timeout=180)
            assert run.state.is_completed(), f"{run.state}\n{log.read_text()[-3000:]}"
        manifest = storage.read_json(str(out_root / "datasets" / "pretrain" / "manifest.json"))
        assert manifest["num_samples"] == sum(1 for _ in Path(digits_tree).rglob("*.png"))
        assert manifest["num_shards"] == -(-manifest["num_samples"] // 500)
    finally:
        _stop(serve)
