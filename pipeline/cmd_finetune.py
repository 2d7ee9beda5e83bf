"""`vitpipe finetune` and `vitpipe evaluate`.

    vitpipe finetune --preset digits_tiny_ft --pretrained RUN_ID_OR_URL_OR_FILE --data TRAIN_URL \
        --val-data VAL_URL --out RUNS_ROOT [--img-size S] [--nproc N] [--steps N] [--run-id ID]
    vitpipe evaluate CHECKPOINT_OR_RUN --data DATASET_URL [--img-size S] [--nproc N] [--out DIR_OR_RUN]
    vitpipe evaluate CHECKPOINT_OR_RUN --fewshot 1,5,10,25 --data TRAIN_URL --val-data VAL_URL

Both end with ONE JSON line on stdout holding the metrics (machine-readable; everything else
printed before it is for humans). The work lives in plain functions (`finetune`,
`evaluate`) that flows and tests call directly.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from typing import Any

from shards import storage

RUN_ID = re.compile(r"^(pretrain|finetune)-\d{8}-\d{6}-[0-9a-f]{6}$")
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".npz")
TIMM_WEIGHTS = "model_timm.safetensors"
# architecture fields a fine-tune preset may pin; compared with the checkpoint's
ARCH_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_dim", "pool", "class_token", "in_chans")


class FinetuneError(ValueError):
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
    patch = int(arch.get("patch_size") or 0)
    if patch and img_size % patch:
        lo, hi = img_size // patch * patch, (img_size // patch + 1) * patch
        raise FinetuneError(
            f"--img-size {img_size} is not divisible by the checkpoint's patch size {patch} ({source}); "
            f"use a multiple of {patch}, e.g. {lo or hi} or {hi}"
        )
    return arch


# ------------------------------------------------------------------------- evaluate


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
) -> dict:
    """Evaluate any checkpoint on any dataset at any resolution; returns the metrics dict.

    nproc == 1 runs in this process; nproc > 1 starts `python -m vit.evaluate` ranks through
    the DeepSpeed launcher (pipeline.launcher.build_argv) and reads rank 0's result.
    """
    from vit.evaluate import EvalJob, run_eval_job

    source = resolve_source(source, runs_root=runs_root)
    if img_size is not None:
        arch = checkpoint_arch(source)
        patch = int(arch.get("patch_size") or 0)
        if patch and img_size % patch:
            raise FinetuneError(
                f"--img-size {img_size} is not divisible by the checkpoint's patch size {patch} ({source}); "
                f"use a multiple of {patch}, e.g. {img_size // patch * patch or patch} or {(img_size // patch + 1) * patch}"
            )
    if nproc < 1:
        raise FinetuneError(f"--nproc {nproc}: must be >= 1")
    job = EvalJob(source=source, data=data, img_size=img_size, batch_size=batch_size, report_dir=report_dir)
    if nproc == 1:
        return run_eval_job(job)
    return _launch_eval(job, nproc=nproc, work_dir=work_dir, timeout=timeout)


def _launch_eval(job, *, nproc: int, work_dir: str | None, timeout: float | None) -> dict:
    import dataclasses
    import tempfile

    from pipeline.launcher import PROJECT_ROOT, _rank_logs, build_argv, diagnose
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
    argv = build_argv(LaunchConfig(nproc_per_node=nproc, master_port=_free_port()), job_path, rank_log_dir=logs)
    argv[argv.index("vit.train")] = "vit.evaluate"  # same launcher, the evaluation entry point
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    endpoint = storage.settings_dict().get("endpoint_url")
    if endpoint:  # --s3-endpoint given to this process: the ranks read it from the environment
        env["AWS_ENDPOINT_URL"] = endpoint
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PROJECT_ROOT, env.get("PYTHONPATH")) if p)
    launcher_log = os.path.join(logs, "launcher.log")
    with open(launcher_log, "w") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT, timeout=timeout)
    if proc.returncode != 0 or not os.path.exists(result_path):
        raise diagnose(launcher_log, _rank_logs(logs), proc.returncode or 1)
    metrics = storage.read_json(result_path)
    metrics["world_size"] = nproc
    return metrics


# ------------------------------------------------------------------------- finetune


def finetune(
    *,
    preset: str,
    pretrained: str,
    data: str,
    out: str,
    val_data: str | None = None,
    img_size: int | None = None,
    nproc: int | None = None,
    steps: int | None = None,
    run_id: str | None = None,
    sets: list[str] | None = None,
    eval_batch_size: int = 64,
    stall_timeout: float | None = None,
    log=print,
) -> dict:
    """Fine-tune `pretrained` on `data` through the training launcher, evaluate on `val_data`.

    Writes into the fine-tune run folder: the eval report (`report/eval.json`,
    `per_class.csv`, `confusion.csv`), `model_timm.safetensors` (timm's key layout), and the
    metrics into run.json. Returns the scalar metrics + `run_id`, `run_url`.
    """
    from pipeline.launcher import launch, make_run_config
    from vit.evaluate import check_same_class_index, scalar_metrics
    from vit.runs import RunFolder

    source = resolve_source(pretrained, runs_root=out)
    if val_data:
        check_same_class_index(data, val_data)
    items = list(sets or [])
    if img_size is not None:
        items.append(f"model.img_size={int(img_size)}")
    cfg = make_run_config(
        preset, data=data, out=out, run_id=run_id, nproc=nproc, steps=steps, init_from=source,
        parent=parent_run_id(source), sets=items,
    )
    if cfg.task != "finetune":
        raise FinetuneError(f"preset {preset} is a pretraining preset (task={cfg.task}); pick a fine-tune preset (*_ft)")
    check_architecture(source, preset=preset, model_name=cfg.model.name, overrides=cfg.model.overrides,
                       img_size=cfg.model.img_size)
    log(f"fine-tune {cfg.run_id}: {source} -> {cfg.model.img_size}px on {data}")
    log(f"run folder: {cfg.run_url}")
    t0 = time.monotonic()
    result = launch(cfg, stall_timeout=stall_timeout)
    train_s = time.monotonic() - t0
    run = RunFolder(cfg.run_url)
    summary: dict[str, Any] = {"run_id": run.run_id, "run_url": run.url, "steps": cfg.schedule.total_steps,
                               "train_seconds": round(train_s, 1), "img_size": cfg.model.img_size}
    if val_data:
        metrics = evaluate(run.url, val_data, img_size=cfg.model.img_size, nproc=cfg.launch.nproc_per_node,
                           report_dir=run.report, batch_size=eval_batch_size,
                           work_dir=os.path.join(result.log_dir, "eval"))
        summary.update(scalar_metrics(metrics))
        summary["val_data"] = val_data
    write_timm_weights(run.url)
    run.finish(status="complete", metrics={k: v for k, v in summary.items() if k not in ("run_id", "run_url")})
    return summary


def write_timm_weights(run_url: str) -> str:
    """`<run>/model_timm.safetensors`: the weights under timm's VisionTransformer key names."""
    from safetensors.torch import save as st_save

    from vit.checkpoint import load_model
    from vit.interop import to_timm_state_dict

    state = {k: v.contiguous() for k, v in to_timm_state_dict(load_model(run_url)).items()}
    url = storage.join(run_url, TIMM_WEIGHTS)
    storage.write_bytes(url, st_save(state, metadata={"format": "pt"}))
    return url


# ---------------------------------------------------------------------------- CLI


def register(subparsers) -> None:
    p = subparsers.add_parser("finetune", help="fine-tune a pretrained ViT (zero head, higher resolution), then evaluate")
    p.add_argument("--preset", required=True, help="fine-tune preset, e.g. digits_tiny_ft, imagenet_384_ft")
    p.add_argument("--pretrained", required=True,
                   help="pretraining run (folder path, s3:// URL or run id under OUT/runs), timm .pth/.safetensors or big_vision .npz")
    p.add_argument("--data", required=True, help="training dataset URL (folder or s3:// prefix with manifest.json)")
    p.add_argument("--val-data", default=None, help="validation dataset URL (same class index as --data)")
    p.add_argument("--out", required=True, help="runs root; the run goes to OUT/runs/<run-id>/")
    p.add_argument("--img-size", type=int, default=None, help="fine-tune resolution (default: the preset's)")
    p.add_argument("--nproc", type=int, default=None, help="ranks (default: the preset's)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's)")
    p.add_argument("--run-id", default=None, help="run id (default: new)")
    p.add_argument("--stall-timeout", type=float, default=None, help="kill the run if no step is logged for this many s")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set optim.lr=0.01")
    p.set_defaults(func=run_finetune)

    e = subparsers.add_parser("evaluate", help="evaluate any checkpoint on any dataset at any resolution")
    e.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN",
                   help="run folder / s3:// URL / run id (with --runs-root), timm .pth/.safetensors or .npz")
    e.add_argument("--data", required=True, help="dataset URL (folder or s3:// prefix with manifest.json)")
    e.add_argument("--img-size", type=int, default=None, help="evaluation resolution (default: the checkpoint's)")
    e.add_argument("--nproc", type=int, default=1, help="evaluation ranks (> 1: started by the DeepSpeed launcher)")
    e.add_argument("--out", default=None, help="where to write the report: a directory, or a run folder (-> its report/)")
    e.add_argument("--runs-root", default=None, help="runs root to resolve a bare run id")
    e.add_argument("--batch-size", type=int, default=64, help="evaluation batch size per rank")
    e.add_argument("--fewshot", default=None, metavar="SHOTS",
                   help="few-shot linear accuracy (vit.fewshot) instead, e.g. 1,5,10,25: shots from --data, scored on --val-data")
    e.add_argument("--val-data", default=None, help="with --fewshot: the held-out dataset")
    e.set_defaults(func=run_evaluate)


def _fail(err: Exception) -> int:
    print(f"vitpipe: error: {err}", file=sys.stderr)
    return 1


def _expected(err: Exception) -> bool:
    from pipeline.launcher import LaunchError
    from vit.config import ConfigError

    return isinstance(err, (FinetuneError, ConfigError, LaunchError, ValueError, FileNotFoundError)) or type(
        err
    ).__name__ in ("StorageError", "StorageNotFound", "DatasetError", "ManifestError")


def run_finetune(args: argparse.Namespace) -> int:
    try:
        summary = finetune(
            preset=args.preset, pretrained=args.pretrained, data=args.data, out=args.out, val_data=args.val_data,
            img_size=args.img_size, nproc=args.nproc, steps=args.steps, run_id=args.run_id, sets=args.sets,
            stall_timeout=args.stall_timeout, log=lambda m: print(m, file=sys.stderr, flush=True),
        )
    except Exception as err:  # one-line errors for bad input; real bugs keep their traceback
        if _expected(err):
            return _fail(err)
        raise
    print(json.dumps(summary), flush=True)
    return 0


def run_fewshot(args: argparse.Namespace, report_dir: str | None) -> int:
    from vit.fewshot import fewshot_checkpoint, parse_shots

    try:
        if not args.val_data:
            raise FinetuneError("--fewshot needs --val-data VAL (the held-out set scored; shots are drawn from --data)")
        line = fewshot_checkpoint(resolve_source(args.checkpoint, runs_root=args.runs_root), args.data, args.val_data,
                                  shots=parse_shots(args.fewshot), img_size=args.img_size, report_dir=report_dir)
    except Exception as err:
        if _expected(err):
            return _fail(err)
        raise
    print(json.dumps(line), flush=True)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from vit.evaluate import scalar_metrics

    report_dir = None
    if args.out:
        is_run = storage.exists(storage.join(args.out, "run.json"))
        report_dir = storage.join(args.out, "report") if is_run else args.out
    if args.fewshot:
        return run_fewshot(args, report_dir)
    try:
        metrics = evaluate(args.checkpoint, args.data, img_size=args.img_size, nproc=args.nproc, report_dir=report_dir,
                           batch_size=args.batch_size, runs_root=args.runs_root)
    except Exception as err:
        if _expected(err):
            return _fail(err)
        raise
    line = scalar_metrics(metrics)
    line.update(source=metrics.get("source"), world_size=metrics.get("world_size", 1))
    if report_dir:
        line["report"] = report_dir
    print(json.dumps(line), flush=True)
    return 0
