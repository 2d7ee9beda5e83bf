"""`vitpipe demo` (what `make demo` runs): the whole pipeline on this machine in a few minutes."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="digits -> shards in a local object store -> DeepSpeed pretrain -> fine-tune -> evaluate",
                              description="Runs the vit_pipeline Prefect flow on scikit-learn's digits with a local "
                              "SeaweedFS object store and 2 DeepSpeed CPU ranks; prints accuracy, run ids and the "
                              "commands to fetch the artifacts, and last one JSON line. A second run in the same --workdir "
                              "reuses every stage whose inputs are unchanged; remove the workdir to start afresh.")
    p.add_argument("--workdir", default=".vitpipe/demo", help="local working folder (object store data, digits trees)")
    p.add_argument("--nproc", type=int, default=2, help="DeepSpeed ranks (default 2)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="pretraining steps (default: preset digits_tiny_aug)")
    p.add_argument("--finetune-steps", type=int, default=None, help="fine-tuning steps (default: preset digits_tiny_ft)")
    p.add_argument("--task-runner", choices=("dask", "threads"), default="dask", help="where shard tasks run (default: local Dask processes)")
    p.add_argument("--stop", action="store_true", help="stop the demo's object store and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.demo import DemoSettings, main, stop_store

    if args.stop:
        print("object store stopped" if stop_store(args.workdir) else "no demo object store running")
        return 0
    settings = DemoSettings(workdir=args.workdir, nproc=args.nproc, pretrain_steps=args.pretrain_steps,
                            finetune_steps=args.finetune_steps, task_runner=args.task_runner)
    return main(settings)
