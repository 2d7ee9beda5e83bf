"""Prefect as a user runs it, against ONE real `prefect server start` for the session (SQLite under
a tmp PREFECT_HOME, free port):

* the server's scheduler creates runs of an interval deployment by itself, and they complete;
* `prefect work-pool ls`, `prefect deployment ls`, `prefect flow-run ls` work and list what exists;
* `prefect --no-prompt deploy --all --prefect-file deploy/prefect.yaml` registers every deployment;
* `prefect worker start --pool vitpipe-cpu --run-once` runs one of them outside a container;
* `vitpipe serve` registers deploy/prefect.yaml's deployments with their cron schedules (it runs
  before `prefect deploy` of the same deployments: one server holds either kind, not both at once).

These fail with the dependency set of pyproject.toml loosened (SQLAlchemy 2.1: no scheduled runs;
fastapi >= 0.151: the CLI and client get HTTP 422).
"""
from __future__ import annotations

import datetime as dt
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
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.integration


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


def _start(argv: list[str], *, env: dict, log: Path, cwd=ROOT) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One `prefect server start` for the session; its scheduler loops every 2 s (default 60 s)."""
    tmp = tmp_path_factory.mktemp("prefect")
    port = free_port()
    home = tmp / "prefect-home"
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", "PREFECT_API_URL": url, "COLUMNS": "250",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"}
    log = tmp / "server.log"
    proc = _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env, log=log)
    try:
        _wait(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200, timeout=120,
              what="prefect server /api/health", procs=[(proc, log)])
        assert any(home.rglob("*.db"))  # SQLite under our PREFECT_HOME
        yield {"url": url, "env": env, "log": log, "tmp": tmp}
    finally:
        _stop(proc)


@pytest.fixture
def client(prefect_server):
    """A sync Prefect client of the session's server; Prefect's own calls in the test (run_deployment) go there too."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server["url"]}):
        with get_client(sync_client=True) as c:
            yield c


def _project_env(prefect_server, digits_tree, out_root) -> dict:
    return {**prefect_server["env"], "VITPIPE_ROOT": str(out_root), "VITPIPE_SOURCE": str(digits_tree),
            "VITPIPE_HOSTFILE": "", "VITPIPE_FT_SOURCE": str(digits_tree), "VITPIPE_EVAL_SOURCE": str(digits_tree),
            "VITPIPE_DASK_ADDRESS": ""}


TICK_FLOW = '''
from prefect import flow

@flow
def tick() -> int:
    return 1

if __name__ == "__main__":
    tick.serve(name="every-3s", interval=3)
'''


@pytest.mark.timeout(240)
def test_scheduler_creates_runs_that_complete(prefect_server, client, tmp_path):
    """An interval deployment gets runs from the server's scheduler alone (none triggered here) and
    the serving process completes at least 2 of them within 90 s."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    script = tmp_path / "tick.py"
    script.write_text(TICK_FLOW)
    log = tmp_path / "serve.log"
    t0 = time.monotonic()
    serve = _start([sys.executable, str(script)], env={**prefect_server["env"], "PREFECT_RUNNER_POLL_FREQUENCY": "1"},
                   log=log, cwd=tmp_path)
    try:
        only = DeploymentFilter(name=DeploymentFilterName(any_=["every-3s"]))

        def completed():
            runs = client.read_flow_runs(deployment_filter=only)
            done = [r for r in runs if r.state_type and r.state_type.value == "COMPLETED"]
            return runs if len(done) >= 2 else None

        runs = _wait(completed, timeout=90, what="2 completed scheduled runs", procs=[(serve, log)])
        took = time.monotonic() - t0
    finally:
        _stop(serve)
    print(f"2 scheduler-created runs completed {took:.1f}s after `serve` started")
    assert all(r.auto_scheduled for r in runs), "every run of the deployment was created by the scheduler"
    server_log = prefect_server["log"].read_text()
    assert "Can't evaluate bulk DML" not in server_log and "Unexpected error in: Scheduler" not in server_log


CRONS = {"shard-nightly": ["30 1 * * *"], "pretrain-weekly": ["0 3 * * 6"], "finetune-daily": ["0 6 * * *"],
         "pipeline-weekly": ["0 2 * * 0"]}


@pytest.mark.timeout(300)
def test_serve_registers_scheduled_deployments_and_runs_one(prefect_server, client, digits_tree, tmp_path):
    from prefect.deployments import run_deployment

    out_root = tmp_path / "store"
    env = _project_env(prefect_server, digits_tree, out_root)
    log = tmp_path / "serve.log"
    started = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
    serve = _start([sys.executable, "-m", "pipeline.cli", "serve", "--file", str(ROOT / "deploy" / "prefect.yaml")],
                   env=env, log=log)
    try:
        def registered():  # `vitpipe serve` creates the 4 deployments
            deps = [d for d in client.read_deployments() if d.name in CRONS and d.updated >= started]
            return deps if len(deps) == 4 else None

        deps = _wait(registered, timeout=120, what="vitpipe serve registering 4 deployments", procs=[(serve, log)])
        crons = {d.name: [s.schedule.cron for s in d.schedules] for d in deps}
        assert crons == CRONS
        assert all(s.active for d in deps for s in d.schedules)

        # trigger the cheap one, with a smaller shard size than the schedule's
        params = {"params": {"source": str(digits_tree), "url": str(out_root / "datasets" / "pretrain"),
                             "name": "corpus", "shard_size": 500}}
        run = run_deployment("shard_dataset/shard-nightly", parameters=params, timeout=180)
        assert run.state.is_completed(), f"{run.state}\n{log.read_text()[-3000:]}"
    finally:
        _stop(serve)
    manifest = storage.read_json(str(out_root / "datasets" / "pretrain" / "manifest.json"))
    assert manifest["num_samples"] == sum(1 for _ in Path(digits_tree).rglob("*.png"))
    assert manifest["num_shards"] == -(-manifest["num_samples"] // 500)


def _prefect(*args: str, env: dict, cwd=ROOT) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "prefect"), *args], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.fixture(scope="session")
def deployed(prefect_server, digits_tree):
    """The work pools of deploy/prefect.yaml, then `prefect --no-prompt deploy --all` of that file."""
    out_root = prefect_server["tmp"] / "store"
    env = _project_env(prefect_server, digits_tree, out_root)
    pools = [_prefect("work-pool", "create", pool, "--type", "process", env=env) for pool in ("vitpipe-cpu", "vitpipe-gpu")]
    for pool in pools:
        out, _ = pool.communicate(timeout=120)
        assert pool.returncode == 0, out[-3000:]
    proc = _prefect("--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml", env=env)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-4000:]
    return {"env": env, "out_root": out_root, "output": out}


@pytest.mark.timeout(300)
def test_prefect_deploy_all_registers_every_deployment(deployed, client):
    import yaml

    want = {d["name"]: d for d in yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())["deployments"]}
    deps = {d.name: d for d in client.read_deployments()}
    assert set(want) <= set(deps), deployed["output"][-3000:]
    for name, spec in want.items():
        dep = deps[name]
        assert dep.work_pool_name == spec["work_pool"]["name"]
        assert [s.schedule.cron for s in dep.schedules] == [s["cron"] for s in spec["schedules"]]
        assert dep.pull_steps == [{"pipeline.deploy_steps.set_project_directory": {}}]
    assert deps["shard-nightly"].parameters["params"]["source"] == deployed["env"]["VITPIPE_SOURCE"]


@pytest.mark.timeout(300)
def test_prefect_cli_lists_what_exists(deployed, prefect_server, client):
    """`prefect work-pool ls`, `deployment ls`, `flow-run ls` (run side by side) exit 0 and name what is there."""
    procs = {cmd: _prefect(*cmd.split(), env=prefect_server["env"]) for cmd in ("work-pool ls", "deployment ls", "flow-run ls")}
    outs = {}
    for cmd, proc in procs.items():
        outs[cmd], _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"prefect {cmd}:\n{outs[cmd][-3000:]}"
    assert "vitpipe-cpu" in outs["work-pool ls"] and "vitpipe-gpu" in outs["work-pool ls"]
    for name in ("shard-nightly", "pretrain-weekly", "finetune-daily", "pipeline-weekly"):
        assert name in outs["deployment ls"], outs["deployment ls"]
    from prefect.client.schemas.sorting import FlowRunSort

    runs = client.read_flow_runs(limit=5, sort=FlowRunSort.EXPECTED_START_TIME_DESC)  # the CLI's order
    assert runs and all(r.name in outs["flow-run ls"] for r in runs), outs["flow-run ls"]


@pytest.mark.timeout(400)
def test_process_worker_runs_a_deployment_outside_a_container(deployed, client, digits_tree, tmp_path):
    """`prefect worker start --pool vitpipe-cpu --run-once` picks up a run of shard-nightly, its pull
    step finds the project from VITPIPE_HOME (no /opt/vitpipe here), and the shard flow completes."""
    from prefect.deployments import run_deployment

    out = tmp_path / "shards"
    params = {"params": {"source": str(digits_tree), "url": str(out), "name": "corpus", "shard_size": 500}}
    run = run_deployment("shard_dataset/shard-nightly", parameters=params, timeout=0)
    env = {**deployed["env"], "VITPIPE_HOME": str(ROOT)}
    worker = _prefect("worker", "start", "--pool", "vitpipe-cpu", "--type", "process", "--run-once", env=env,
                      cwd=tmp_path)  # not the project directory: the pull step gets there
    log, _ = worker.communicate(timeout=300)
    assert worker.returncode == 0, log[-4000:]
    state = client.read_flow_run(run.id).state
    assert state.is_completed(), f"{state}\n{log[-4000:]}"
    manifest = storage.read_json(str(out / "manifest.json"))
    assert manifest["num_samples"] == sum(1 for _ in Path(digits_tree).rglob("*.png"))


@pytest.mark.timeout(300)
def test_vitpipe_deploy_refuses_an_unknown_work_pool(deployed, tmp_path):
    """`vitpipe deploy` checks the pools the file names before `prefect deploy`: one line, exit 2, nothing registered."""
    import yaml

    doc = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())
    doc["deployments"][0]["work_pool"]["name"] = "vitpipe-tpu"
    doc["deployments"][0]["name"] = "shard-on-tpu"
    bad = tmp_path / "prefect.yaml"
    bad.write_text(yaml.safe_dump(doc))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "deploy", "--file", str(bad)], env=deployed["env"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "deployment shard-on-tpu: work pool 'vitpipe-tpu' does not exist" in err[0]
    assert "prefect work-pool create vitpipe-tpu" in err[0]


