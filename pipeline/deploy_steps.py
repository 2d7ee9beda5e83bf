"""Prefect deployment steps named in deploy/prefect.yaml; a worker runs them before each flow run.

`set_project_directory` replaces Prefect's `set_working_directory` with a fixed path: the
directory comes from the worker's environment (`VITPIPE_HOME`), else it is the checkout or
install that holds this package, so the same deployment runs in the image (VITPIPE_HOME=/opt/vitpipe)
and on a plain host with `pip install -e .`.
"""
from __future__ import annotations

import os
from pathlib import Path

from shards.errors import VitpipeError

HOME_VARIABLE = "VITPIPE_HOME"
PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


class StepError(VitpipeError):
    """A deployment step that cannot run on this worker (names the variable and the fix)."""


def project_directory(env: dict[str, str] | None = None) -> str:
    """$VITPIPE_HOME, else the directory holding the installed `pipeline` package; it must hold pipeline/flows.py."""
    env = os.environ if env is None else env
    directory = env.get(HOME_VARIABLE) or PROJECT_ROOT
    if not os.path.isfile(os.path.join(directory, "pipeline", "flows.py")):
        raise StepError(f"{HOME_VARIABLE}={directory} does not hold pipeline/flows.py; set {HOME_VARIABLE} to the "
                        "vitpipe checkout (or install) this worker runs, or unset it to use the installed package")
    return directory


def set_project_directory() -> dict[str, str]:
    """Pull step: change to the project directory, where the deployments' entrypoints resolve."""
    directory = project_directory()
    os.chdir(directory)
    return {"directory": directory}


# ----------------------------------------------------------------------------- vitpipe deploy


def check_work_pools(deployments: list[dict], *, client) -> None:
    """Every work pool the deployments name exists on the Prefect server (else a run would wait forever)."""
    from prefect.exceptions import ObjectNotFound

    known: dict[str, bool] = {}
    for dep in deployments:
        pool = (dep.get("work_pool") or {}).get("name")
        if not pool:
            continue
        if pool not in known:
            try:
                client.read_work_pool(pool)
                known[pool] = True
            except ObjectNotFound:
                known[pool] = False
        if not known[pool]:
            raise StepError(f"deployment {dep['name']}: work pool {pool!r} does not exist at {client.api_url}; create it "
                            f"(prefect work-pool create {pool} --type process) and start a worker for it")


def deploy(path: str, *, only: list[str] | None = None) -> int:
    """`vitpipe deploy`: check the file's environment variables and work pools, then run
    `prefect --no-prompt deploy` from the project directory (all deployments, or `only`)."""
    import subprocess
    import sys

    from prefect.client.orchestration import get_client

    from pipeline.cmd_flows import read_deployments

    path = os.path.abspath(path)
    deployments = read_deployments(path, only=only)  # names a missing environment variable
    with get_client(sync_client=True) as client:
        check_work_pools(deployments, client=client)
    names = [f"--name={d['name']}" for d in deployments] if only else ["--all"]
    argv = [os.path.join(os.path.dirname(sys.executable), "prefect"), "--no-prompt", "deploy", *names, "--prefect-file", path]
    return subprocess.run(argv, cwd=project_directory()).returncode
