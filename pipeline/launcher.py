"""Start DeepSpeed training ranks from a typed RunConfig and watch them.

`build_argv(launch_cfg, train_config_path)` -> the DeepSpeed launcher argv (a list, never a
shell string); `launch(cfg)` checks what can be checked before any rank starts, writes the
run config, runs the launcher with one log file per rank, and raises `LaunchError` naming the
failed rank, its exit code and the tail of its log. `stall_timeout` kills the process group
when metrics.csv gets no new step for that long.
"""
from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cluster import fit_layout, hostfile_nodes, launch_overrides, node_hostfile
from shards import storage
from vit.config import ConfigError, LaunchConfig, RunConfig
from vit.runs import RunFolder

PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
# what vit.train writes when the launcher terminates a surviving rank (Python handler / faulthandler dump)
TERMINATED_MARKERS = ("terminated by the launcher", "(most recent call first)")


class LaunchError(RuntimeError):
    """A launch that failed; `rank` (-1 if unknown), `exit_code`, `log_tail`, `log_path`."""

    def __init__(self, message: str, *, rank: int = -1, exit_code: int | None = None, log_tail: str = "",
                 log_path: str | None = None) -> None:
        super().__init__(message)
        self.rank, self.exit_code, self.log_tail, self.log_path = rank, exit_code, log_tail, log_path


@dataclass
class LaunchResult:
    run_id: str
    run_url: str
    returncode: int
    duration_s: float
    log_dir: str
    rank_logs: dict[int, str] = field(default_factory=dict)


def local_dir(cfg: RunConfig) -> str:
    """Where ranks on this node keep their working copy of the run (the run folder itself when local)."""
    if cfg.local_dir:
        return cfg.local_dir
    return f"/tmp/vitpipe-runs/{RunFolder(cfg.run_url).run_id}" if storage.is_s3(cfg.run_url) else cfg.run_url


def log_dir(cfg: RunConfig) -> str:
    node = cfg.launch.node_rank or 0
    return cfg.launch.log_dir or os.path.join(local_dir(cfg), "logs", f"node{node}")


def build_argv(launch_cfg: LaunchConfig, train_config_path: str, *, rank_log_dir: str | None = None) -> list[str]:
    """The `deepspeed` launcher argv that starts `python -m vit.train --config PATH` on every rank."""
    lc = launch_cfg
    argv = [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    if lc.hostfile:
        argv += ["--hostfile", lc.hostfile]
        if not lc.no_ssh:
            argv += ["--launcher", lc.launcher]
    else:
        argv += ["--num_nodes", str(lc.num_nodes)]
    argv += ["--num_gpus", str(lc.nproc_per_node)]
    if lc.no_ssh:
        argv += ["--no_ssh", f"--node_rank={lc.node_rank}", f"--master_addr={lc.master_addr}"]
    elif lc.master_addr:
        argv += [f"--master_addr={lc.master_addr}"]
    argv += [f"--master_port={lc.master_port}"]
    if rank_log_dir:
        argv += [f"--enable_each_rank_log={rank_log_dir}"]
    if lc.bind_cores_to_rank:
        argv += ["--bind_cores_to_rank"]
    argv += ["--module", "vit.train", "--config", train_config_path]
    return argv


def make_run_config(preset: str, *, data: str, out: str, run_id: str | None = None, nproc: int | None = None,
                    steps: int | None = None, hostfile: str | None = None, launcher: str | None = None,
                    no_ssh: bool = False, node_rank: int | None = None, master_addr: str | None = None,
                    master_port: int | None = None, init_from: str | None = None, parent: str | None = None,
                    sets: list[str] | None = None, nnodes: int | None = None, check_only: bool = False) -> RunConfig:
    """A RunConfig from a preset plus the everyday CLI knobs and `key=value` overrides, its data
    layout fitted to the world size (pipeline.cluster)."""
    from vit.config import override_dict
    from vit.presets import get_preset
    from vit.runs import new_run_id

    cfg = get_preset(preset)
    if no_ssh and not run_id:
        raise ConfigError("--no-ssh starts one launcher per node: pass the same --run-id to every node")
    items = []
    kind = cfg.task
    run = RunFolder.create(out, run_id or new_run_id(kind))
    items += [f"data.url={_js(data)}", f"run_url={_js(run.url)}", f"run_id={_js(run.run_id)}"]
    if steps is not None:
        items += [f"schedule.total_steps={steps}"]
        if cfg.schedule.warmup_steps >= steps:
            items += [f"schedule.warmup_steps={max(0, steps // 10)}"]
    items += launch_overrides(nnodes=nnodes, nproc=nproc, hostfile=hostfile, no_ssh=no_ssh, node_rank=node_rank,
                              master_addr=master_addr, check_only=check_only)
    if launcher:
        items += [f"launch.launcher={_js(launcher)}"]
    if no_ssh:
        items += ["launch.no_ssh=true", f"launch.node_rank={node_rank}", f"launch.master_addr={_js(master_addr)}"]
    elif master_addr:
        items += [f"launch.master_addr={_js(master_addr)}"]
    if master_port is not None:
        items += [f"launch.master_port={master_port}"]
    if init_from:
        items += [f"init_from={_js(init_from)}"]
    if parent:
        items += [f"parent={_js(parent)}"]
    data = override_dict(cfg.to_dict(), items + list(sets or []))
    fit_layout(data)
    return RunConfig.from_dict(data)


def _js(value) -> str:
    import json

    return json.dumps(value)


def preflight(cfg: RunConfig) -> None:
    """Errors that can be found before any rank starts (one line each, naming what to fix)."""
    from vit.data import TrainStream

    cfg.check_ready()
    try:  # reads the manifest (a dataset without one does not exist) and checks batch / lanes / workers
        TrainStream(cfg.data.url, img_size=cfg.model.img_size, global_batch_size=cfg.batch.global_batch_size,
                    rank=0, world_size=cfg.launch.world_size, seed=cfg.data.seed, num_workers=cfg.data.num_workers,
                    lanes=cfg.data.lanes, augment=cfg.data.augment, label_mode=cfg.data.label_mode)
    except ValueError as err:
        raise ConfigError(f"data: {err}") from err
    run = RunFolder(cfg.run_url)
    if cfg.checkpoint.resume == "must" and run.latest_checkpoint() is None:
        raise ConfigError(f"checkpoint.resume=must but {run.checkpoints} holds no checkpoint to resume from")
    if cfg.task == "finetune" and "://" not in cfg.init_from and not storage.is_s3(cfg.init_from):
        if not os.path.exists(cfg.init_from):
            raise ConfigError(f"init_from={cfg.init_from!r} does not exist; pass a run folder, model dir or weights file")
    if cfg.launch.hostfile:
        nodes = hostfile_nodes(cfg.launch.hostfile)
        if cfg.launch.num_nodes != len(nodes):
            raise ConfigError(
                f"{cfg.launch.hostfile} lists {len(nodes)} nodes but launch.num_nodes={cfg.launch.num_nodes}; make them agree"
            )


def write_config(cfg: RunConfig) -> str:
    """Write the run config to the node-local run dir (and the run folder); return the local path."""
    path = os.path.join(local_dir(cfg), "launch", f"config-node{cfg.launch.node_rank or 0}.json")
    storage.write_json(path, cfg.to_dict())
    return path


def _rank_logs(directory: str) -> dict[int, str]:
    logs: dict[int, str] = {}
    for path in sorted(glob.glob(os.path.join(directory, "*_rank*.log"))):  # newest prefix wins
        logs[int(re.search(r"_rank(\d+)\.log$", path).group(1))] = path
    return logs


def _tail(path: str, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _last_metrics_step(path: str) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            last = f.read().decode(errors="replace").strip().splitlines()[-1]
        return int(last.split(",", 1)[0])
    except (OSError, ValueError, IndexError):
        return -1


def diagnose(launcher_log: str, rank_logs: dict[int, str], returncode: int) -> LaunchError:
    """Find the rank that failed: the one whose log does not say the launcher terminated it."""
    m = re.findall(r"exits with return code = (-?\d+)", _tail(launcher_log, 200))
    code = int(m[-1]) if m else returncode
    failed = [r for r, p in sorted(rank_logs.items()) if not any(m in _tail(p, 400) for m in TERMINATED_MARKERS)]
    rank = failed[0] if failed else -1
    path = rank_logs.get(rank, launcher_log)
    tail = _tail(path)
    return LaunchError(
        f"rank {rank} failed with exit code {code}; log {path}:\n{tail}", rank=rank, exit_code=code, log_tail=tail,
        log_path=path,
    )


def launch(cfg: RunConfig, *, stall_timeout: float | None = None, timeout: float | None = None,
           env: dict | None = None) -> LaunchResult:
    """Run the training ranks of this node to the end; raise LaunchError if any rank fails or stalls."""
    cfg = node_hostfile(cfg)
    preflight(cfg)
    config_path = write_config(cfg)
    logs = log_dir(cfg)
    os.makedirs(logs, exist_ok=True)
    for old in glob.glob(os.path.join(logs, "*.log")):
        os.unlink(old)
    argv = build_argv(cfg.launch, config_path, rank_log_dir=logs)
    run_env = {**os.environ, **(env or {})}
    run_env["PYTHONPATH"] = os.pathsep.join(p for p in (PROJECT_ROOT, run_env.get("PYTHONPATH")) if p)
    run_env["PYTHONUNBUFFERED"] = "1"
    launcher_log = os.path.join(logs, "launcher.log")
    metrics = os.path.join(local_dir(cfg), "metrics.csv")
    t0 = time.monotonic()
    with open(launcher_log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=run_env, cwd=PROJECT_ROOT,
                                start_new_session=True)
        # the stall watchdog arms once a new step shows up (start-up, e.g. a first JIT build, is not a stall)
        last_step, last_change, armed = _last_metrics_step(metrics), time.monotonic(), False
        try:
            while proc.poll() is None:
                time.sleep(1.0)
                step = _last_metrics_step(metrics)
                if step != last_step:
                    last_step, last_change, armed = step, time.monotonic(), True
                if stall_timeout and armed and time.monotonic() - last_change > stall_timeout:
                    _kill_group(proc)
                    err = LaunchError(f"stalled: {metrics} got no new step for {stall_timeout:.0f}s (last step "
                                      f"{last_step}); killed the launch", exit_code=proc.returncode,
                                      log_tail=_tail(launcher_log), log_path=launcher_log)
                    _mark_failed(cfg, err)
                    raise err
                if timeout and time.monotonic() - t0 > timeout:
                    _kill_group(proc)
                    raise LaunchError(f"timed out after {timeout:.0f}s; killed the launch", log_path=launcher_log,
                                      log_tail=_tail(launcher_log))
        except BaseException:
            _kill_group(proc)
            raise
    rank_logs = _rank_logs(logs)
    if proc.returncode != 0:
        err = diagnose(launcher_log, rank_logs, proc.returncode)
        _mark_failed(cfg, err)
        raise err
    run = RunFolder(cfg.run_url)
    return LaunchResult(run_id=run.run_id, run_url=run.url, returncode=0, duration_s=time.monotonic() - t0,
                        log_dir=logs, rank_logs=rank_logs)


def _mark_failed(cfg: RunConfig, err: LaunchError) -> None:
    """Node 0 records the failure in run.json (a re-run that resumes sets it back to running)."""
    run = RunFolder(cfg.run_url)
    if (cfg.launch.node_rank or 0) == 0 and storage.exists(run.run_json):
        run.finish(status="failed", metrics={"error": str(err).splitlines()[0]})


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
