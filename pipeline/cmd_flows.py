"""`vitpipe run CONFIG.yaml` (the whole pipeline from a config file) and `vitpipe serve`
(the scheduled deployments of deploy/prefect.yaml, served from one long-running process)."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
from pathlib import Path
from typing import Any

from shards.errors import JobFailed, VitpipeError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PREFECT_YAML = PROJECT_ROOT / "deploy" / "prefect.yaml"
_TEMPLATE = re.compile(r"\{\{\s*\$([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class DeploymentFileError(VitpipeError, ValueError):
    """A prefect.yaml that cannot be served (names the file, the deployment and the key)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser("run", help="run the whole pipeline (shard -> pretrain -> finetune -> evaluate) from a YAML config",
                                description="The config is validated before anything runs (see deploy/pipeline.example.yaml).")
    run.add_argument("config", metavar="CONFIG.yaml")
    run.add_argument("--check", action="store_true", help="only validate the config and print it resolved")
    run.set_defaults(func=run_cmd)

    serve = subparsers.add_parser("serve", help="serve the scheduled deployments of deploy/prefect.yaml from this process",
                                  description="Builds flow.to_deployment(...) for each deployment in prefect.yaml (cron "
                                  "schedules, parameters, tags) and serves them until interrupted. {{ $VAR }} in the "
                                  "file is replaced by the environment variable VAR.")
    serve.add_argument("--file", default=str(DEFAULT_PREFECT_YAML), help="prefect.yaml to serve (default: deploy/prefect.yaml)")
    serve.add_argument("--only", action="append", default=None, metavar="NAME", help="serve only this deployment (repeatable)")
    serve.add_argument("--limit", type=int, default=None, help="at most this many flow runs at once")
    serve.add_argument("--list", action="store_true", help="print the deployments and their next run times, then exit")
    serve.set_defaults(func=serve_cmd)

    deploy = subparsers.add_parser("deploy", help="register deploy/prefect.yaml's deployments with the Prefect server "
                                   "(`prefect deploy`), after checking its environment variables and work pools")
    deploy.add_argument("--file", default=str(DEFAULT_PREFECT_YAML), help="prefect.yaml (default: deploy/prefect.yaml)")
    deploy.add_argument("--only", action="append", default=None, metavar="NAME", help="only this deployment (repeatable)")
    deploy.set_defaults(func=deploy_cmd)


# ----------------------------------------------------------------------------- run


def run_cmd(args: argparse.Namespace) -> int:
    from pipeline.settings import load_pipeline_config

    config = load_pipeline_config(args.config)  # the whole YAML, every `set` entry resolved: before anything runs
    if args.check:
        print(json.dumps(config.model_dump(), indent=2))
        return 0
    if config.s3_endpoint:  # entry point: ranks and workers inherit the environment
        os.environ["AWS_ENDPOINT_URL"] = config.s3_endpoint
    from pipeline.flows import check_storage, prefect_api, vit_pipeline

    check_storage(config)  # object store up, credentials right, buckets there: before any stage
    with prefect_api():
        result = vit_pipeline(config)
    print(json.dumps(result))
    return 0


# ----------------------------------------------------------------------------- serve / prefect.yaml


def substitute_env(value: Any, env: dict[str, str], *, where: str) -> Any:
    """Replace ``{{ $VAR }}`` (prefect.yaml's syntax) everywhere in ``value``; a missing VAR is an error."""
    if isinstance(value, dict):
        return {k: substitute_env(v, env, where=f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_env(v, env, where=f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        def repl(m: re.Match) -> str:
            if m.group(1) not in env:
                raise DeploymentFileError(f"{where}: environment variable {m.group(1)} is not set; export it (the file's "
                                          "header says what it holds) and run again")
            return env[m.group(1)]

        return _TEMPLATE.sub(repl, value)
    return value


def read_deployments(path: str | os.PathLike, *, env: dict[str, str] | None = None, only: list[str] | None = None) -> list[dict]:
    """The ``deployments`` of a prefect.yaml (all, or those named in ``only``), checked (name,
    entrypoint, schedules with cron) and with ``{{ $VAR }}`` replaced from ``env`` (default os.environ)."""
    import yaml

    path = str(path)
    with open(path, encoding="utf-8") as fh:
        doc = yaml.safe_load(fh) or {}
    deployments = doc.get("deployments")
    if not isinstance(deployments, list) or not deployments:
        raise DeploymentFileError(f"{path}: no `deployments:` list")
    out = []
    for i, dep in enumerate(deployments):
        where = f"{path}: deployments[{i}]"
        for key in ("name", "entrypoint"):
            if not dep.get(key):
                raise DeploymentFileError(f"{where}: missing `{key}`")
        where = f"{path}: deployment {dep['name']}"
        for j, sched in enumerate(dep.get("schedules") or []):
            if "cron" not in sched:
                raise DeploymentFileError(f"{where}: schedules[{j}] needs `cron`")
        out.append(dep)
    if only:
        unknown = sorted(set(only) - {d["name"] for d in out})
        if unknown:
            raise DeploymentFileError(f"{path}: no deployment named {unknown[0]!r}")
        out = [d for d in out if d["name"] in only]
    env = os.environ if env is None else env
    return [substitute_env(d, env, where=f"{path}: deployment {d['name']}") for d in out]


def load_entrypoint(entrypoint: str):
    """``pipeline/flows.py:vit_pipeline`` -> the flow object (imported as a module of this package)."""
    file, _, name = entrypoint.partition(":")
    if not name or not file.endswith(".py"):
        raise DeploymentFileError(f"entrypoint {entrypoint!r}: expected path/to/module.py:flow_name")
    module = importlib.import_module(file[:-3].replace("/", "."))
    try:
        return getattr(module, name)
    except AttributeError:
        raise DeploymentFileError(f"entrypoint {entrypoint!r}: {file} has no flow {name!r}") from None


def build_deployments(deployments: list[dict]) -> list:
    """``flow.to_deployment(...)`` for each entry (cron schedules with timezones, parameters, tags)."""
    from prefect.schedules import Cron

    out = []
    for dep in deployments:
        flow = load_entrypoint(dep["entrypoint"])
        schedules = [Cron(s["cron"], timezone=s.get("timezone", "UTC"), active=s.get("active", True))
                     for s in dep.get("schedules") or []]
        out.append(flow.to_deployment(
            name=dep["name"], schedules=schedules or None, parameters=dep.get("parameters") or {},
            tags=dep.get("tags") or [], description=dep.get("description"),
        ))
    return out


def next_runs(cron: str, *, timezone: str = "UTC", after=None, count: int = 3) -> list:
    """The next ``count`` fire times of a cron schedule after ``after`` (default now), as the Prefect
    server's scheduler computes them."""
    import asyncio
    import datetime as dt

    from prefect.server.schemas.schedules import CronSchedule

    start = after or dt.datetime.now(dt.timezone.utc)
    schedule = CronSchedule(cron=cron, timezone=timezone)
    return list(asyncio.run(schedule.get_dates(n=count, start=start)))


def deploy_cmd(args: argparse.Namespace) -> int:
    from pipeline.deploy_steps import deploy

    return deploy(args.file, only=args.only)  # DeploymentFileError / StepError: one line, exit 2 (cli.main)


def serve_cmd(args: argparse.Namespace) -> int:
    deployments = read_deployments(args.file, only=args.only)
    if args.list:
        for dep in deployments:
            for sched in dep.get("schedules") or []:
                tz = sched.get("timezone", "UTC")
                times = ", ".join(t.isoformat() for t in next_runs(sched["cron"], timezone=tz))
                print(f"{dep['name']} ({dep['entrypoint']}): cron {sched['cron']!r} {tz}; next: {times}")
        return 0
    built = build_deployments(deployments)
    print(f"serving {len(built)} deployment(s) from {args.file}: {', '.join(d['name'] for d in deployments)}", flush=True)
    return serve_until_signal(built, limit=args.limit)


def serve_until_signal(built: list, *, limit: int | None, grace: float = 5.0) -> int:
    """Serve the deployments from a Prefect Runner in a thread; on SIGINT/SIGTERM ask it to stop, wait at
    most `grace` seconds (its shutdown talks to the Prefect server, which may be gone), then exit 130/143."""
    import asyncio
    import signal
    import sys
    import threading

    from prefect.runner import Runner

    runner = Runner(limit=limit, pause_on_shutdown=False)
    for deployment in built:
        runner.add_deployment(deployment)
    failed: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(runner.start())
        except BaseException as err:  # reported by the main thread
            failed.append(err)

    received: list[int] = []
    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        received.append(signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    thread = threading.Thread(target=run, name="prefect-runner", daemon=True)
    thread.start()
    while thread.is_alive() and not stop.wait(0.5):
        pass
    if not received:
        if failed:
            raise JobFailed(f"the Prefect runner stopped: {str(failed[0]).splitlines()[0] if str(failed[0]) else type(failed[0]).__name__}")
        return 0
    stopper = threading.Thread(target=runner.stop, name="prefect-runner-stop", daemon=True)
    stopper.start()
    stopper.join(grace)
    name = signal.Signals(received[0]).name
    sys.stdout.flush()
    print(f"vitpipe serve: stopped by {name}; no new flow runs start here; the deployments stay registered "
          "(re-run `vitpipe serve` to serve them again)", file=sys.stderr, flush=True)
    os._exit(128 + received[0])  # the runner's threads may still wait on a server that is gone
