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
