"""The `vitpipe` command line: one argparse tree, each area registers its own subcommands.

`main` is the one error path: a `VitpipeError` (every error a user can cause or fix) becomes
one line on stderr and its `exit_code` (2 bad input, 1 failed job); a traceback only with
`--debug` or VITPIPE_DEBUG=1. SIGINT / SIGTERM stop the command (`pipeline.interrupts`): one line
saying what was kept, exit 130 / 143.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from pipeline.console import LEVELS, LOG, setup_logging, version
from pipeline.interrupts import Interrupted, signals_raise
from shards.errors import VitpipeError

# Each module pipeline/cmd_<area>.py exposes register(subparsers).
COMMANDS = ["demo", "shard", "objectstore", "train", "finetune", "artifacts", "flows", "inspect", "export", "index"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitpipe",
        description="Image corpus -> WebDataset shards -> DeepSpeed ViT pretraining -> fine-tuning, orchestrated by Prefect.",
    )
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error (also VITPIPE_DEBUG=1)")
    parser.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (default: $AWS_ENDPOINT_URL, else AWS)")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LEVELS, help="log level (default: INFO)")
    parser.add_argument("--quiet", action="store_true", help="warnings and errors only; no progress bars")
    parser.add_argument("--version", action="version", version=f"vitpipe {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for area in COMMANDS:
        try:
            module = importlib.import_module(f"pipeline.cmd_{area}")
        except ModuleNotFoundError as err:
            if err.name == f"pipeline.cmd_{area}":
                continue  # area not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("VITPIPE_DEBUG", "") not in ("", "0")
    setup_logging(args.log_level, quiet=args.quiet)
    LOG.debug("vitpipe %s (%s)", args.command, version())
    try:
        with signals_raise():
            if args.s3_endpoint:
                from shards import storage

                storage.configure(endpoint_url=args.s3_endpoint)
            return int(args.func(args) or 0)
    except VitpipeError as err:
        if debug:
            traceback.print_exc()
        print(f"vitpipe {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except Interrupted as stop:
        if debug:
            traceback.print_exc()
        print(stop.line(args.command), file=sys.stderr, flush=True)
        return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
