"""`vitpipe shard SOURCE OUT_URL ...` and `vitpipe verify URL`."""
from __future__ import annotations

import sys

from pipeline.settings import DatasetParams
from shards.plan import ShardSettings as _S

_DATA = DatasetParams.model_fields


def register(subparsers) -> None:
    p = subparsers.add_parser("shard", help="shard an image corpus into WebDataset tars + manifest.json",
                              description="Read SOURCE (class folders, per-synset tars, jsonl/csv manifest; local or "
                                          "s3://) and write <name>-NNNNNN.tar shards + manifest.json to OUT_URL.")
    p.add_argument("source", help="class-folder tree, folder of <synset>.tar, .jsonl or .csv manifest (local or s3://)")
    p.add_argument("out_url", help="output folder or s3://bucket/prefix")
    p.add_argument("--format", choices=["imagefolder", "i21k-tars", "jsonl", "csv"], default=None,
                   help="source format (default: auto-detected)")
    p.add_argument("--name", default=_DATA["name"].default, help=f"shard name prefix (default: {_DATA['name'].default})")
    p.add_argument("--classes", default=None, help="reuse a class index: dataset URL, manifest.json, JSON list or .txt")
    p.add_argument("--shard-size", type=int, default=_DATA["shard_size"].default,
                   help=f"max samples per shard (default: {_DATA['shard_size'].default})")
    p.add_argument("--max-shard-bytes", type=int, default=None, help=f"max bytes per shard (default: {_S.max_shard_bytes:.0e})")
    p.add_argument("--resize", type=int, default=None, metavar="S",
                   help="re-encode with the shorter side S px (aspect kept, never upscaled); default pass-through")
    p.add_argument("--quality", type=int, default=None, help=f"JPEG/WebP quality when re-encoding (default: {_S.quality})")
    p.add_argument("--exclude", action="append", default=None, metavar="DATASET_OR_LIST",
                   help="drop exact and near duplicates of this evaluation set (dataset URL, source or .txt list); repeatable")
    p.add_argument("--near-dup-threshold", type=int, default=None,
                   help=f"dHash Hamming distance counted as near duplicate (default: {_S.near_dup_threshold})")
    p.add_argument("--dedup-within", choices=["exact", "near"], default=None,
                   help="duplicates inside the source to drop (the first in listing order is kept): exact byte "
                        "copies (default), or also near duplicates such as re-encoded or resized copies (decodes "
                        "every image)")
    p.add_argument("--validate", choices=["header", "decode"], default=None,
                   help="pass-through check: header + end marker (fast, default) or decode every image")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: every CPU core this process may use)")
    p.add_argument("--dask", default=None, metavar="ADDRESS",
                   help="list, scan and write on the Dask cluster at ADDRESS (tcp://host:8786; default: "
                        "$VITPIPE_DASK_ADDRESS, else --workers local processes); the shards are the same bytes")
    p.add_argument("--partitions", type=int, default=None,
                   help="pieces the source is cut into for listing and scanning (default: 4 per worker)")
    p.add_argument("--window", type=int, default=None, metavar="RECORDS",
                   help="write shards while the rest of the source is scanned: plan it in windows of consecutive "
                        "class folders/tars/manifest blocks of at least RECORDS records, each shuffled on its own; --partitions then "
                        "cuts each window (default 2 per worker). Default: one global shuffle, the first shard after "
                        "the whole scan")
    p.add_argument("--seed", type=int, default=None, help=f"seed of the global shuffle (default: {_S.seed})")
    p.add_argument("--strict", action="store_true", default=None, help="fail instead of skipping any bad record")
    p.set_defaults(func=run_shard)

    v = subparsers.add_parser("verify", help="check every shard of a dataset against its manifest")
    v.add_argument("url", help="dataset folder / s3:// prefix (or its manifest.json)")
    v.add_argument("--no-decode", action="store_true", help="skip decoding every image (faster)")
    v.set_defaults(func=run_verify)


SETTINGS = ("format", "classes", "max_shard_bytes", "resize", "quality", "exclude", "near_dup_threshold", "dedup_within",
            "validate", "seed", "strict")


def run_shard(args) -> int:
    from pipeline.stages import shard_stage

    params = DatasetParams(source=args.source, url=args.out_url, name=args.name, shard_size=args.shard_size,
                           workers=args.workers, dask_address=args.dask, partitions=args.partitions,
                           window=args.window,
                           settings={k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None})
    manifest = shard_stage(params, progress=not args.quiet)
    if manifest["skipped_stage"]:
        print(f"{args.out_url} already holds this dataset (same source fingerprint and settings): "
              f"{manifest['num_samples']} samples in {manifest['num_shards']} shards; nothing to do")
    return 0


def run_verify(args) -> int:
    from shards.verify import verify_dataset

    problems = verify_dataset(args.url, decode=not args.no_decode, progress=not args.quiet)
    if problems:
        for line in problems:
            print(f"PROBLEM {line}", file=sys.stderr)
        print(f"vitpipe verify: {len(problems)} problem(s) in {args.url}", file=sys.stderr)
        return 1
    print(f"{args.url}: every shard matches the manifest")
    return 0
