"""Start DeepSpeed training ranks from a typed RunConfig and watch them.

`build_argv(launch_cfg, train_config_path)` -> the DeepSpeed launcher argv (a list, never a
shell string); `launch(cfg)` checks what can be checked before any rank starts, writes the
run config, runs the launcher with one log file per rank, follows the ranks through their
status files (`vit.status`: never their log text), logs progress to the "vitpipe" logger, and
raises `LaunchError` naming the failed rank, its exit code and its log. `stall_timeout` kills
the process group when rank 0 reports no new step for that long. run.json is not touched here
(the stage layer owns it).
"""
from __future__ import annotations

import glob
import logging
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
from shards.errors import JobFailed
from vit.config import ConfigError, LaunchConfig, RunConfig
from vit.runs import RunFolder
from vit.status import last, read_status, status_path

PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
log = logging.getLogger("vitpipe")


class LaunchError(JobFailed):
    """A launch that failed; `rank` (-1 if unknown), `rank_exit_code`, `log_tail`, `log_path`.

    Transient: a relaunch resumes from the last checkpoint and may succeed (a rank killed, a node lost)."""

    transient = True

    def __init__(self, message: str, *, rank: int = -1, rank_exit_code: int | None = None, log_tail: str = "",
                 log_path: str | None = None, transient: bool = True) -> None:
        super().__init__(message)
        self.rank, self.rank_exit_code, self.log_tail, self.log_path = rank, rank_exit_code, log_tail, log_path
        self.transient = transient


@dataclass
class LaunchResult:
    run_id: str
    run_url: str
    returncode: int
    duration_s: float
    log_dir: str
    rank_logs: dict[int, str] = field(default_factory=dict)
    final: dict = field(default_factory=dict)  # rank 0's last status record (finished / stopped)


def build_argv(launch_cfg: LaunchConfig, train_config_path: str, *, rank_log_dir: str | None = None,
               module: str = "vit.train") -> list[str]:
    """The `deepspeed` launcher argv that starts `python -m MODULE --config PATH` on every rank."""
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
    argv += ["--module", module, "--config", train_config_path]
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


def check_dataset(url: str) -> None:
    """A dataset is a folder or prefix with manifest.json (written last: without it the dataset does not exist)."""
    if not storage.exists(storage.join(url, "manifest.json")):
        raise ConfigError(f"data.url={url}: no manifest.json there (a dataset without one does not exist); "
                          "pass a dataset written by `vitpipe shard`, or `vitpipe index` shards made elsewhere")


def preflight(cfg: RunConfig) -> None:
    """Errors that can be found before any rank starts (one line each, naming what to fix)."""
    from vit.data import TrainStream

    cfg.check_ready()
    check_dataset(cfg.data.url)
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
    path = os.path.join(cfg.local_run_dir, "launch", f"config-node{cfg.launch.node_rank or 0}.json")
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


def diagnose(launcher_log: str, logs: str, returncode: int) -> LaunchError:
    """The rank that failed, from the ranks' status files: the first that reported `failed`, else the
    first that neither finished nor was terminated by the launcher (killed, crashed in C)."""
    rank_logs = _rank_logs(logs)
    ends = {r: last(read_status(status_path(logs, r)), "failed", "terminated", "finished", "stopped") for r in rank_logs}
    failed = sorted(r for r, end in ends.items() if end and end["event"] == "failed")
    silent = sorted(r for r, end in ends.items() if end is None)
    rank = (failed or silent or [-1])[0]
    record = ends.get(rank) if rank in failed else {}
    code = record.get("exit_code", returncode)
    path = rank_logs.get(rank, launcher_log)
    what = f": {record['error']}" if record.get("error") else ""
    return LaunchError(f"rank {rank} failed with exit code {code}{what}; log {path}", rank=rank, rank_exit_code=code,
                       log_tail=_tail(path), log_path=path, transient=record.get("transient", True))


class Progress:
    """Follows rank 0's status file; logs step, loss, img/s and ETA at most every `every` seconds."""

    def __init__(self, path: str, *, run_id: str, every: float = 10.0) -> None:
        self.path, self.run_id, self.every = path, run_id, every
        self.step, self.changed, self.shown = -1, time.monotonic(), 0.0
        self.first: tuple[int, float] | None = None
        self.offset = 0  # read only what was appended since the last poll (a long run writes many records)

    def poll(self) -> bool:
        """Read new records; True when rank 0 reported a new step since the last poll."""
        records, self.offset = read_status(self.path, offset=self.offset)
        record = last(records, "step")
        if record is None or record["step"] == self.step:
            return False
        now = time.monotonic()
        self.step, self.changed = record["step"], now
        self.first = self.first or (record["step"], now)
        if now - self.shown >= self.every or record["step"] == record["total_steps"]:
            self.shown = now
            done, started = record["step"] - self.first[0], now - self.first[1]
            eta = (record["total_steps"] - record["step"]) * started / done if done else None
            log.info("%s: step %d/%d loss %.4f img/s %.1f%s%s", self.run_id, record["step"], record["total_steps"],
                     record["loss"], record["images_per_sec"], f" ETA {eta:.0f}s" if eta is not None else "",
                     f" corrupt samples {record['corrupt']}" if record.get("corrupt") else "")
        return True


def launch(cfg: RunConfig, *, stall_timeout: float | None = None, timeout: float | None = None,
           env: dict | None = None) -> LaunchResult:
    """Run the training ranks of this node to the end; raise LaunchError if any rank fails or stalls."""
    cfg = node_hostfile(cfg)
    preflight(cfg)
    config_path = write_config(cfg)
    logs = cfg.log_dir
    os.makedirs(logs, exist_ok=True)
    for old in glob.glob(os.path.join(logs, "*.log")) + glob.glob(os.path.join(logs, "status-rank*.jsonl")):
        os.unlink(old)
    argv = build_argv(cfg.launch, config_path, rank_log_dir=logs)
    run_env = {**os.environ, **(env or {})}
    run_env["PYTHONPATH"] = os.pathsep.join(p for p in (PROJECT_ROOT, run_env.get("PYTHONPATH")) if p)
    run_env["PYTHONUNBUFFERED"] = "1"
    launcher_log = os.path.join(logs, "launcher.log")
    progress = Progress(status_path(logs, 0), run_id=RunFolder(cfg.run_url).run_id)
    log.info("%s: %d rank(s); logs in %s", progress.run_id, cfg.launch.world_size, logs)
    t0 = time.monotonic()
    with open(launcher_log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=run_env, cwd=PROJECT_ROOT,
                                start_new_session=True)
        armed = False  # the stall watchdog arms at the first step (start-up, e.g. a first JIT build, is not a stall)
        try:
            while proc.poll() is None:
                time.sleep(1.0)
                armed = progress.poll() or armed
                if stall_timeout and armed and time.monotonic() - progress.changed > stall_timeout:
                    _kill_group(proc)
                    raise LaunchError(f"stalled: rank 0 reported no new step for {stall_timeout:.0f}s (last step "
                                      f"{progress.step}); killed the launch; logs in {logs}", rank_exit_code=proc.returncode,
                                      log_tail=_tail(launcher_log), log_path=launcher_log)
                if timeout and time.monotonic() - t0 > timeout:
                    _kill_group(proc)
                    raise LaunchError(f"timed out after {timeout:.0f}s; killed the launch; logs in {logs}",
                                      log_path=launcher_log, log_tail=_tail(launcher_log))
        except BaseException:
            _kill_group(proc)
            progress.poll()  # the last step reached, also when stopped by a signal or a stall
            raise
    progress.poll()
    if proc.returncode != 0:
        raise diagnose(launcher_log, logs, proc.returncode)
    run = RunFolder(cfg.run_url)
    return LaunchResult(run_id=run.run_id, run_url=run.url, returncode=0, duration_s=time.monotonic() - t0,
                        log_dir=logs, rank_logs=_rank_logs(logs),
                        final=_final(logs))


def _final(logs: str) -> dict:
    """The end record of the lowest rank on this node (rank 0 on node 0): finished or stopped."""
    ranks = sorted(int(re.search(r"status-rank(\d+)\.jsonl$", p).group(1))
                   for p in glob.glob(os.path.join(logs, "status-rank*.jsonl")))
    return next((end for r in ranks if (end := last(read_status(status_path(logs, r)), "finished", "stopped"))), {})


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
