"""`vitpipe finetune` and `vitpipe evaluate`: adapters over pipeline.stages / pipeline.models.

    vitpipe finetune --preset digits_tiny_ft --pretrained RUN_ID_OR_URL_OR_FILE --data TRAIN_URL \
        --val-data VAL_URL --out RUNS_ROOT [--img-size S] [--nproc N] [--steps N] [--run-id ID]
    vitpipe evaluate CHECKPOINT_OR_RUN --data DATASET_URL [--img-size S] [--nproc N] [--out DIR_OR_RUN]
    vitpipe evaluate RUN --data DATASET_URL --root ROOT      (an `evaluate` run under ROOT/runs/)
    vitpipe evaluate CHECKPOINT_OR_RUN --fewshot 1,5,10,25 --data TRAIN_URL --val-data VAL_URL

Both end with ONE JSON line on stdout holding the metrics (machine-readable; everything else
printed before it is for humans).
"""
from __future__ import annotations

import argparse
import json
import sys

from pipeline.cmd_train import add_launch_args, check_config, print_result, train_params
from pipeline.settings import EvalParams
from shards import storage

_EVAL = EvalParams.model_fields


def register(subparsers) -> None:
    p = subparsers.add_parser("finetune", help="fine-tune a pretrained ViT (zero head, higher resolution), then evaluate")
    p.add_argument("--preset", required=True, help="fine-tune preset, e.g. digits_tiny_ft, imagenet_384_ft")
    p.add_argument("--pretrained", required=True,
                   help="pretraining run (folder path, s3:// URL, run id under OUT/runs or latest:pretrain), "
                        "timm .pth/.safetensors or big_vision .npz")
    p.add_argument("--val-data", default=None, help="validation dataset URL (same class index as --data)")
    p.add_argument("--img-size", type=int, default=None, help="fine-tune resolution (default: the preset's)")
    p.add_argument("--eval-batch-size", type=int, default=_EVAL["batch_size"].default, help="evaluation batch size per rank")
    add_launch_args(p)
    p.add_argument("--posemb-resample", choices=["bicubic", "scipy_linear"], default=None,
                   help="position-embedding resampling to the new grid: timm's bicubic (the preset's default) or "
                        "scipy_linear (the official code's scipy.ndimage.zoom(order=1)); config key model.posemb_resample")
    p.set_defaults(func=run_finetune)

    e = subparsers.add_parser("evaluate", help="evaluate any checkpoint on any dataset at any resolution")
    e.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN",
                   help="run folder / s3:// URL / run id (with --runs-root or --root), timm .pth/.safetensors or .npz")
    e.add_argument("--data", required=True, help="dataset URL (folder or s3:// prefix with manifest.json)")
    e.add_argument("--img-size", type=int, default=_EVAL["img_size"].default, help="evaluation resolution (default: the checkpoint's)")
    e.add_argument("--nproc", type=int, default=_EVAL["nproc"].default, help="evaluation ranks (> 1: started by the DeepSpeed launcher)")
    e.add_argument("--out", default=None, help="where to write the report: a directory, or a run folder (-> its report/)")
    e.add_argument("--runs-root", default=None, help="runs root to resolve a bare run id")
    e.add_argument("--root", default=None,
                   help="record an `evaluate` run under ROOT/runs/ (the stage the flows run: skipped when equal)")
    e.add_argument("--batch-size", type=int, default=_EVAL["batch_size"].default, help="evaluation batch size per rank")
    e.add_argument("--fewshot", default=None, metavar="SHOTS",
                   help="few-shot linear accuracy (vit.fewshot) instead, e.g. 1,5,10,25: shots from --data, scored on --val-data")
    e.add_argument("--val-data", default=None, help="with --fewshot: the held-out dataset")
    e.set_defaults(func=run_evaluate)


def run_finetune(args: argparse.Namespace) -> int:
    from pipeline.stages import train_stage

    if args.posemb_resample:
        args.sets = [*args.sets, f"model.posemb_resample={args.posemb_resample}"]
    if args.check:  # --pretrained is named in the config, not opened
        return check_config(args, train_params(args, img_size=args.img_size), init_from=args.pretrained)
    out = train_stage(train_params(args, img_size=args.img_size), kind="finetune", root=args.out, dataset_url=args.data,
                      run_id=args.run_id, pretrained=args.pretrained, val_data=args.val_data,
                      eval_params=EvalParams(batch_size=args.eval_batch_size, nproc=args.nproc or 1))
    sys.stdout.flush()
    with _stderr_as_stdout():
        print_result(out)
    print(json.dumps({"run_id": out["run_id"], "run_url": out["run_url"], **out["metrics"]}), flush=True)
    return 0


def run_fewshot(args: argparse.Namespace, report_dir: str | None) -> int:
    from pipeline.models import FinetuneError, resolve_source
    from vit.fewshot import fewshot_checkpoint, parse_shots

    if not args.val_data:
        raise FinetuneError("--fewshot needs --val-data VAL (the held-out set scored; shots are drawn from --data)")
    line = fewshot_checkpoint(resolve_source(args.checkpoint, runs_root=args.runs_root), args.data, args.val_data,
                              shots=parse_shots(args.fewshot), img_size=args.img_size, report_dir=report_dir)
    print(json.dumps(line), flush=True)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from pipeline.models import evaluate
    from vit.evaluate import scalar_metrics

    if args.root:
        from pipeline.stages import evaluate_stage

        out = evaluate_stage(EvalParams(batch_size=args.batch_size, img_size=args.img_size, nproc=args.nproc),
                             root=args.root, model_run=args.checkpoint, dataset_url=args.data)
        print(json.dumps({"run_id": out["run_id"], "run_url": out["run_url"], "skipped": out["skipped"],
                          **out["metrics"]}), flush=True)
        return 0
    report_dir = None
    if args.out:
        is_run = storage.exists(storage.join(args.out, "run.json"))
        report_dir = storage.join(args.out, "report") if is_run else args.out
    if args.fewshot:
        return run_fewshot(args, report_dir)
    metrics = evaluate(args.checkpoint, args.data, img_size=args.img_size, nproc=args.nproc, report_dir=report_dir,
                       batch_size=args.batch_size, runs_root=args.runs_root, progress=not args.quiet)
    line = scalar_metrics(metrics)
    line.update(source=metrics.get("source"), world_size=metrics.get("world_size", 1))
    if report_dir:
        line["report"] = report_dir
    print(json.dumps(line), flush=True)
    return 0


def _stderr_as_stdout():
    """The human lines go to stderr: stdout ends with the one JSON line."""
    import contextlib

    return contextlib.redirect_stdout(sys.stderr)
