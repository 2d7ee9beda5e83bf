"""`vitpipe pretrain`: DeepSpeed pretraining from a preset (see vit/presets.py), through the stage layer."""
from __future__ import annotations

import argparse

from pipeline.settings import TrainParams

_TRAIN = TrainParams.model_fields


def add_launch_args(p: argparse.ArgumentParser) -> None:
    """The flags `vitpipe pretrain` and `vitpipe finetune` share; defaults are pipeline.settings.TrainParams'."""
    p.add_argument("--data", required=True, help="dataset URL (folder or s3:// prefix holding manifest.json)")
    p.add_argument("--out", required=True, help="runs root; the run goes to OUT/runs/<run-id>/")
    p.add_argument("--nproc", type=int, default=None, help="ranks per node (default: the preset's, or the hostfile's slots)")
    p.add_argument("--nnodes", type=int, default=None,
                   help="number of nodes (with --no-ssh and no hostfile: every node's launcher passes the same N)")
    p.add_argument("--check", action="store_true",
                   help="resolve and validate the run config for this cluster size, print it, exit (nothing is launched "
                        "or opened)")
    p.add_argument("--run-id", default=None,
                   help="run id (default: the run with the same inputs: skipped if complete, resumed if not; else new)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (default: the preset's)")
    p.add_argument("--hostfile", default=None, help="MPI-style hostfile: one 'HOST slots=N' line per node")
    p.add_argument("--launcher", default=None, choices=["pdsh", "openmpi", "mvapich", "slurm", "impi"],
                   help="multi-node launcher used with --hostfile (default pdsh)")
    p.add_argument("--no-ssh", action="store_true", help="start only this node's ranks (one launcher per node)")
    p.add_argument("--node-rank", type=int, default=None, help="this node's index (with --no-ssh)")
    p.add_argument("--master-addr", default=None, help="address of node 0 (with --no-ssh)")
    p.add_argument("--master-port", type=int, default=None, help="rendezvous port (default 29500)")
    p.add_argument("--stall-timeout", type=float, default=_TRAIN["stall_timeout"].default,
                   help=f"relaunch when rank 0 reports no new step for this many s (default {_TRAIN['stall_timeout'].default:.0f})")
    p.add_argument("--retries", type=int, default=_TRAIN["retries"].default,
                   help=f"relaunches after a failed or stalled launch, each resuming (default {_TRAIN['retries'].default})")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set optim.lr=0.001 --set launch.zero_stage=1")


def train_params(args: argparse.Namespace, **more) -> TrainParams:
    """The stage settings from the shared launch flags."""
    return TrainParams(preset=args.preset, set=args.sets, steps=args.steps, nproc_per_node=args.nproc, nnodes=args.nnodes,
                       hostfile=args.hostfile, launcher=args.launcher, no_ssh=args.no_ssh, node_rank=args.node_rank,
                       master_addr=args.master_addr, master_port=args.master_port, stall_timeout=args.stall_timeout,
                       retries=args.retries, **more)


def check_config(args: argparse.Namespace, params: TrainParams, *, init_from: str | None = None) -> int:
    """`--check`: the whole run config for this cluster size, resolved and validated, printed; nothing launched."""
    from pipeline.cluster import check_command
    from pipeline.stages import build_run_config

    return check_command(lambda: build_run_config(params, dataset_url=args.data, root=args.out,
                                                  run_id=args.run_id or f"{args.command}-check", init_from=init_from,
                                                  check_only=True))


def print_result(out: dict) -> None:
    """The last lines of a training command: the run, what happened, corrupt samples."""
    m = out.get("metrics") or {}
    print(f"run id: {out['run_id']}")
    print(f"run folder: {out['run_url']}")
    if out["skipped"]:
        print("a complete run with the same inputs exists: nothing to do")
    elif out.get("node_rank"):
        print(f"node {out['node_rank']}: its ranks finished; node 0 completes the run")
    elif out.get("stopped"):
        print(f"stopped at step {m.get('steps')} (stop_after); re-run the same command to resume")
    else:
        loss = m.get("final_loss")
        print(f"complete: {m.get('steps')} steps, final loss {loss:.4f}" if isinstance(loss, float) else "complete")
    if m.get("corrupt_samples"):
        print(f"corrupt samples: {m['corrupt_samples']} (each replaced by a neighbour); run `vitpipe verify` on the data")


def register(subparsers) -> None:
    p = subparsers.add_parser("pretrain", help="DeepSpeed ViT pretraining on shards (resumable, multi-node)")
    p.add_argument("--preset", required=True, help="run preset, e.g. digits_tiny, i21k_vit_b16, jft_vit_l16")
    add_launch_args(p)
    p.set_defaults(func=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    from pipeline.stages import train_stage

    if args.check:
        return check_config(args, train_params(args))
    out = train_stage(train_params(args), kind="pretrain", root=args.out, dataset_url=args.data, run_id=args.run_id)
    print_result(out)
    return 0
