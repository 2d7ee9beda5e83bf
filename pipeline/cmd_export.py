"""`vitpipe export RUN --to timm|npz|safetensors DIR`: a finished run's model in another tool's format.

    vitpipe export latest:finetune --root s3://bucket/vit --to timm ./my-vit
    python -c "import timm; timm.create_model('local-dir:./my-vit', pretrained=True)"

RUN is a run folder / s3:// URL, a run id or `latest:<kind>` (both with --root), as for
`vitpipe artifacts get`.
"""
from __future__ import annotations

import argparse
import sys

from vit.export import FORMATS

_HOW_TO_LOAD = {
    "timm": "timm.create_model('local-dir:{dest}', pretrained=True)",
    "npz": "timm.create_model(C['architecture'], pretrained=True, num_classes=C['num_classes'], "
           "pretrained_cfg_overlay=dict(C['pretrained_cfg'], file='{file}', custom_load=True), **C['model_args']) "
           "with C = the config.json that `vitpipe export --to timm` writes",
    "safetensors": "vit.checkpoint.load_model('{dest}')",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="write a finished run's model as a timm folder, big_vision .npz or safetensors",
                              description="timm: a folder timm.create_model('local-dir:DIR', pretrained=True) opens; "
                                          "npz: google-research/vision_transformer layout (model.npz); "
                                          "safetensors: this project's model.safetensors + model_config.json.")
    p.add_argument("ref", metavar="RUN", help="run folder / s3:// URL, run id or latest:<kind> (the last two with --root)")
    p.add_argument("--to", dest="fmt", choices=FORMATS, required=True, help="output format")
    p.add_argument("dest", metavar="DIR", help="output folder (local or s3://)")
    p.add_argument("--root", default=None, help="storage root holding runs/ (for run ids and latest:<kind>)")
    p.set_defaults(func=run_export)


def export_run(ref: str, fmt: str, dest: str, *, root: str | None = None) -> list[str]:
    """Load the finished model of run ``ref`` and write it to ``dest`` as ``fmt``; returns the files written."""
    from pipeline import registry
    from shards import storage
    from vit.checkpoint import load_model
    from vit.export import TIMM_FOLDER, export_model

    info = registry.resolve(ref, root=root)
    if not info.complete:
        raise registry.RegistryError(f"{info.run_id} is {info.status}, not complete: it has no final model to export")
    timm_cfg = storage.join(info.url, TIMM_FOLDER, "config.json")
    labels = (storage.read_json(timm_cfg)["pretrained_cfg"].get("label_names")
              if storage.exists(timm_cfg) else None)
    return export_model(load_model(info.url), fmt, dest, label_names=labels)


def run_export(args: argparse.Namespace) -> int:
    from pipeline.registry import RegistryError
    from shards.storage import StorageError

    try:
        files = export_run(args.ref, args.fmt, args.dest, root=args.root)
    except (RegistryError, StorageError, FileNotFoundError, ValueError) as err:
        print(f"vitpipe export: error: {err}", file=sys.stderr)
        return 2
    for f in files:
        print(f)
    print("load with: " + _HOW_TO_LOAD[args.fmt].format(dest=args.dest, file=files[0]), file=sys.stderr)
    return 0
