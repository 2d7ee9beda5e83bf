"""The `vitpipe` command line: one argparse tree, each area registers its own subcommands."""
from __future__ import annotations

import argparse
import importlib
import sys

from pipeline.console import LEVELS, LOG, setup_logging, version

# Each module pipeline/cmd_<area>.py exposes register(subparsers).
COMMANDS = ["demo", "shard", "objectstore", "train", "finetune", "artifacts", "flows", "inspect", "export", "index"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitpipe",
        description="Image corpus -> WebDataset shards -> DeepSpeed ViT pretraining -> fine-tuning, orchestrated by Prefect.",
    )
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
    setup_logging(args.log_level, quiet=args.quiet)
    LOG.debug("vitpipe %s (%s)", args.command, version())
    if args.s3_endpoint:
        from shards import storage

        storage.configure(endpoint_url=args.s3_endpoint)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
