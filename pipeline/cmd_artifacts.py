"""`vitpipe artifacts ls ROOT` and `vitpipe artifacts get RUN DEST`: the run registry from the command line."""
from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("artifacts", help="list runs and download a run's files (sha256-checked)",
                              description="Runs live under ROOT/runs/<run-id>/ (local folder or s3://).")
    sub = p.add_subparsers(dest="artifacts_command", metavar="ls|get", required=True)

    ls = sub.add_parser("ls", help="list runs: id, kind, status, created, key metric, parent")
    ls.add_argument("root", metavar="ROOT", help="storage root holding runs/ (local folder or s3://bucket/prefix)")
    ls.add_argument("--kind", default=None, choices=("shard", "pretrain", "finetune", "evaluate", "pipeline"))
    ls.add_argument("--json", action="store_true", help="one JSON object per run, with lineage")
    ls.set_defaults(func=run_ls)

    get = sub.add_parser("get", help="download a run (or one file of it) and check every sha256")
    get.add_argument("ref", metavar="RUN", help="run URL, run id (with --root) or latest:<kind> (with --root)")
    get.add_argument("dest", metavar="DEST", help="local folder to write into")
    get.add_argument("--root", default=None, help="storage root holding runs/ (for run ids and latest:<kind>)")
    get.add_argument("--file", default=None, help="only this file of the run, e.g. model.safetensors")
    get.set_defaults(func=run_get)


def _fmt_metric(info) -> str:
    metric = info.key_metric()
    if metric is None:
        return "-"
    name, value = metric
    return f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}"


def format_runs(runs) -> str:
    rows = [("RUN", "KIND", "STATUS", "CREATED", "METRIC", "PARENT")]
    for r in runs:
        status = r.status if r.complete else f"{r.status} (incomplete)"
        rows.append((r.run_id, r.kind, status, r.created, _fmt_metric(r), r.parent or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def run_ls(args: argparse.Namespace) -> int:
    from pipeline import registry

    runs = registry.list_runs(args.root, kind=args.kind)
    if args.json:
        for r in runs:
            print(json.dumps({"run_id": r.run_id, "url": r.url, "kind": r.kind, "status": r.status, "created": r.created,
                              "finished": r.finished, "parent": r.parent, "metrics": r.metrics, "lineage": r.lineage}))
        return 0
    if not runs:
        print(f"no runs under {registry.runs_url(args.root)}")
        return 0
    print(format_runs(runs))
    return 0


def run_get(args: argparse.Namespace) -> int:
    from pipeline import registry

    paths = registry.get_run(args.ref, args.dest, root=args.root, file=args.file, progress=not args.quiet)
    info = registry.resolve(args.ref, root=args.root)
    print(f"{info.run_id} ({info.kind}, {info.status}): {len(paths)} file(s) -> {args.dest}, sha256 checked")
    lineage = ", ".join(f"{k}={v}" for k, v in sorted(info.lineage.items()))
    print(f"parent: {info.parent or '-'}; lineage: {lineage or '-'}")
    return 0
