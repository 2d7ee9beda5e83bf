"""The weights of a run or file: find them, check they fit, evaluate them.

`resolve_source` turns a run id / run folder / weights file into a URL `vit.checkpoint.load_model`
accepts; `check_architecture` refuses a checkpoint the preset cannot fine-tune; `evaluate` scores
any checkpoint on any dataset (in this process, or on DeepSpeed ranks). (The timm export of a run's
final weights is `vit.export.export_timm`, written by rank 0 beside model.safetensors.)
"""
from __future__ import annotations

import os
import subprocess


from shards import storage
from shards.errors import VitpipeError

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".npz")
# architecture fields a fine-tune preset may pin; compared with the checkpoint's
ARCH_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_dim", "pool", "class_token", "in_chans")


class FinetuneError(VitpipeError, ValueError):
    """Bad input to finetune / evaluate; the message names the input and the fix."""


# ------------------------------------------------------------------------ sources


def resolve_source(source: str, *, runs_root: str | None = None) -> str:
    """A checkpoint argument -> a URL `vit.checkpoint.load_model` accepts.

    Accepts a weights file (.pth/.pt/.safetensors/.npz), a run folder or model directory
    (local or s3://), or a run id found under RUNS_ROOT/runs/<id>.
    """
    source = str(source).rstrip("/")
    if source.lower().endswith(WEIGHT_SUFFIXES):
        if not storage.exists(source):
            raise FinetuneError(f"checkpoint {source} does not exist; pass an existing weights file, run folder or run id")
        return source
    if storage.exists(storage.join(source, "model_config.json")):
        return source
    if runs_root and "/" not in source:
        candidate = storage.join(runs_root, "runs", source)
        if storage.exists(storage.join(candidate, "model_config.json")):
            return candidate
        if storage.exists(storage.join(candidate, "run.json")):
            raise FinetuneError(
                f"run {source} under {runs_root}/runs has no final weights (model_config.json); "
                "it has not completed: finish it (rerun `vitpipe pretrain --run-id ...` to resume) first"
            )
    if storage.exists(storage.join(source, "run.json")):
        raise FinetuneError(f"run folder {source} has no final weights (model_config.json); the run has not completed")
    where = f" or a run id under {runs_root}/runs/" if runs_root else " (a run id needs --out RUNS_ROOT)"
    raise FinetuneError(
        f"checkpoint {source!r} not found: pass a run folder (path or s3:// URL), a .pth/.safetensors/.npz file{where}"
    )


def parent_run_id(source: str) -> str | None:
    """The run id of a run folder of this project (None for plain weight files)."""
    run_json = storage.join(source, "run.json")
    if source.lower().endswith(WEIGHT_SUFFIXES) or not storage.exists(run_json):
        return None
    return storage.read_json(run_json).get("run_id")


def checkpoint_arch(source: str) -> dict:
    """The architecture config of a checkpoint (cheap for run folders: model_config.json only)."""
    if not source.lower().endswith(WEIGHT_SUFFIXES):
        return storage.read_json(storage.join(source, "model_config.json"))
    from vit.checkpoint import load_model

    return load_model(source).config


def check_architecture(source: str, *, preset: str, model_name: str, overrides: dict, img_size: int) -> dict:
    """Raise unless the checkpoint is the architecture the preset fine-tunes, at a usable resolution."""
    import vit.model

    arch = checkpoint_arch(source)
    pinned = {k: v for k, v in overrides.items() if k in ARCH_FIELDS}
    if not pinned:  # the preset names a registry model: all of its fields are expected
        pinned = {k: v for k, v in getattr(vit.model, model_name)().items() if k in ARCH_FIELDS}
    for key, want in pinned.items():
        have = arch.get(key)
        if have is not None and have != want:
            raise FinetuneError(
                f"checkpoint {source} is another architecture than preset {preset} expects: {key}={have} "
                f"(preset: {key}={want}); pick a preset for this model or pass --set model.overrides.{key}={have}"
            )
    check_resolution(source, img_size, arch=arch)
    return arch


def check_resolution(source: str, img_size: int, *, arch: dict | None = None) -> None:
    """Raise unless `img_size` is a multiple of the checkpoint's patch size."""
    patch = int((arch or checkpoint_arch(source)).get("patch_size") or 0)
    if patch and img_size % patch:
        lo, hi = img_size // patch * patch, (img_size // patch + 1) * patch
        raise FinetuneError(
            f"--img-size {img_size} is not divisible by the checkpoint's patch size {patch} ({source}); "
            f"use a multiple of {patch}, e.g. {lo or hi} or {hi}"
        )


# ------------------------------------------------------------------------- evaluate


def evaluate(
    source: str,
    data: str,
    *,
    img_size: int | None = None,
    nproc: int = 1,
    report_dir: str | None = None,
    batch_size: int = 64,
    runs_root: str | None = None,
    work_dir: str | None = None,
    timeout: float | None = None,
    progress: bool = False,
) -> dict:
    """Evaluate any checkpoint on any dataset at any resolution; returns the metrics dict.

    nproc == 1 runs in this process; nproc > 1 starts `python -m vit.evaluate` ranks through
    the DeepSpeed launcher (pipeline.launcher.build_argv) and reads rank 0's result.
    """
    from vit.evaluate import EvalJob, run_eval_job

    source = resolve_source(source, runs_root=runs_root)
    if img_size is not None:
        check_resolution(source, img_size)
    if nproc < 1:
        raise FinetuneError(f"--nproc {nproc}: must be >= 1")
    job = EvalJob(source=source, data=data, img_size=img_size, batch_size=batch_size, report_dir=report_dir,
                  progress=progress)
    if nproc == 1:
        return run_eval_job(job)
    return _launch_eval(job, nproc=nproc, work_dir=work_dir, timeout=timeout)


def _launch_eval(job, *, nproc: int, work_dir: str | None, timeout: float | None) -> dict:
    import dataclasses
    import tempfile

    from pipeline.launcher import PROJECT_ROOT, build_argv, diagnose
    from pipeline.objectstore import free_port
    from vit.config import LaunchConfig

    work = work_dir or tempfile.mkdtemp(prefix="vitpipe-eval-")
    os.makedirs(work, exist_ok=True)
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    result_path = os.path.join(work, "result.json")
    if os.path.exists(result_path):
        os.unlink(result_path)
    job_path = os.path.join(work, "eval_job.json")
    storage.write_json(job_path, {**dataclasses.asdict(job), "result": result_path})
    argv = build_argv(LaunchConfig(nproc_per_node=nproc, master_port=free_port()), job_path, rank_log_dir=logs,
                      module="vit.evaluate")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    endpoint = storage.settings_dict().get("endpoint_url")
    if endpoint:  # --s3-endpoint given to this process: the ranks read it from the environment
        env["AWS_ENDPOINT_URL"] = endpoint
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PROJECT_ROOT, env.get("PYTHONPATH")) if p)
    launcher_log = os.path.join(logs, "launcher.log")
    with open(launcher_log, "w") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT, timeout=timeout)
    if proc.returncode != 0 or not os.path.exists(result_path):
        raise diagnose(launcher_log, logs, proc.returncode or 1)
    metrics = storage.read_json(result_path)
    metrics["world_size"] = nproc
    return metrics
