"""`vitpipe pretrain`: launch DeepSpeed pretraining from a preset (see vit/presets.py)."""
from __future__ import annotations

import argparse
import sys


def add_launch_args(p: argparse.ArgumentParser) -> None:
    """The launch flags shared by `vitpipe pretrain` (and usable by `vitpipe finetune`)."""
    p.add_argument("--data", required=True, help="dataset URL (folder or s3:// prefix holding manifest.json)")
    p.add_argument("--out", required=True, help="runs root; the run goes to OUT/runs/<run-id>/")
    p.add_argument("--nproc", type=int, default=None, help="ranks per node (default: the preset's, or the hostfile's slots)")
    p.add_argument("--nnodes", type=int, default=None,
                   help="number of nodes (with --no-ssh and no hostfile: every node's launcher passes the same N)")
    p.add_argument("--check", action="store_true",
                   help="resolve and validate the run config for this cluster size, print it, exit (nothing is launched)")
    p.add_argument("--run-id", default=None, help="run id (default: new); an existing run with checkpoints resumes")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (default: the preset's)")
    p.add_argument("--hostfile", default=None, help="MPI-style hostfile: one 'HOST slots=N' line per node")
    p.add_argument("--launcher", default=None, choices=["pdsh", "openmpi", "mvapich", "slurm", "impi"],
                   help="multi-node launcher used with --hostfile (default pdsh)")
    p.add_argument("--no-ssh", action="store_true", help="start only this node's ranks (one launcher per node)")
    p.add_argument("--node-rank", type=int, default=None, help="this node's index (with --no-ssh)")
    p.add_argument("--master-addr", default=None, help="address of node 0 (with --no-ssh)")
    p.add_argument("--master-port", type=int, default=None, help="rendezvous port (default 29500)")
    p.add_argument("--stall-timeout", type=float, default=None, help="kill the run if no step is logged for this many s")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set optim.lr=0.001 --set launch.zero_stage=1")


def register(subparsers) -> None:
    p = subparsers.add_parser("pretrain", help="DeepSpeed ViT pretraining on shards (resumable, multi-node)")
    p.add_argument("--preset", required=True, help="run preset, e.g. digits_tiny, i21k_vit_b16, jft_vit_l16")
    add_launch_args(p)
    p.set_defaults(func=run_pretrain)


def run_from_args(args: argparse.Namespace, *, preset: str, init_from: str | None = None, parent: str | None = None) -> int:
    from pipeline.launcher import LaunchError, launch, make_run_config
    from vit.config import ConfigError

    def build():
        return make_run_config(
            preset, data=args.data, out=args.out, run_id=args.run_id, nproc=args.nproc, steps=args.steps,
            hostfile=args.hostfile, launcher=args.launcher, no_ssh=args.no_ssh, node_rank=args.node_rank,
            master_addr=args.master_addr, master_port=args.master_port, init_from=init_from, parent=parent,
            sets=args.sets, nnodes=args.nnodes, check_only=args.check,
        )

    if args.check:
        from pipeline.cluster import check_command

        return check_command(build)
    try:
        cfg = build()
        print(f"run id: {cfg.run_id}")
        print(f"run folder: {cfg.run_url}", flush=True)
        result = launch(cfg, stall_timeout=args.stall_timeout)
    except (ConfigError, LaunchError) as err:
        print(f"vitpipe: error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # storage / manifest errors carry one-line messages
        if type(err).__name__ in ("StorageError", "StorageNotFound", "ManifestError", "FileNotFoundError"):
            print(f"vitpipe: error: {err}", file=sys.stderr)
            return 1
        raise
    print(f"done in {result.duration_s:.0f}s: {result.run_url}")
    return 0


def run_pretrain(args: argparse.Namespace) -> int:
    return run_from_args(args, preset=args.preset)
