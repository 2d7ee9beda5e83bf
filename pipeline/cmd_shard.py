"""`vitpipe shard SOURCE OUT_URL ...` and `vitpipe verify URL`."""
from __future__ import annotations

import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("shard", help="shard an image corpus into WebDataset tars + manifest.json",
                              description="Read SOURCE (class folders, per-synset tars, jsonl/csv manifest; local or "
                                          "s3://) and write <name>-NNNNNN.tar shards + manifest.json to OUT_URL.")
    p.add_argument("source", help="class-folder tree, folder of <synset>.tar, .jsonl or .csv manifest (local or s3://)")
    p.add_argument("out_url", help="output folder or s3://bucket/prefix")
    p.add_argument("--format", choices=["imagefolder", "i21k-tars", "jsonl", "csv"], default=None,
                   help="source format (default: auto-detected)")
    p.add_argument("--name", default="data", help="shard name prefix (default: data)")
    p.add_argument("--classes", default=None, help="reuse a class index: dataset URL, manifest.json, JSON list or .txt")
    p.add_argument("--shard-size", type=int, default=10_000, help="max samples per shard (default: 10000)")
    p.add_argument("--max-shard-bytes", type=int, default=1_000_000_000, help="max bytes per shard (default: 1e9)")
    p.add_argument("--resize", type=int, default=None, metavar="S",
                   help="re-encode with the shorter side S px (aspect kept, never upscaled); default pass-through")
    p.add_argument("--quality", type=int, default=90, help="JPEG/WebP quality when re-encoding (default: 90)")
    p.add_argument("--exclude", action="append", default=[], metavar="DATASET_OR_LIST",
                   help="drop exact and near duplicates of this evaluation set (dataset URL, source or .txt list); repeatable")
    p.add_argument("--near-dup-threshold", type=int, default=6, help="dHash Hamming distance counted as near duplicate")
    p.add_argument("--dedup-within", choices=["exact", "near"], default="exact",
                   help="duplicates inside the source to drop (the first in listing order is kept): exact byte "
                        "copies (default), or also near duplicates such as re-encoded or resized copies (decodes "
                        "every image)")
    p.add_argument("--validate", choices=["header", "decode"], default="header",
                   help="pass-through check: header + end marker (fast, default) or decode every image")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: every CPU core this process may use)")
    p.add_argument("--seed", type=int, default=0, help="seed of the global shuffle (default: 0)")
    p.add_argument("--strict", action="store_true", help="fail instead of skipping any bad record")
    p.set_defaults(func=run_shard)

    v = subparsers.add_parser("verify", help="check every shard of a dataset against its manifest")
    v.add_argument("url", help="dataset folder / s3:// prefix (or its manifest.json)")
    v.add_argument("--no-decode", action="store_true", help="skip decoding every image (faster)")
    v.set_defaults(func=run_verify)


def run_shard(args) -> int:
    from shards import ShardError, shard_dataset
    from shards.workers import usable_cores
    from shards.index import looks_like_webdataset
    from shards.storage import StorageError

    if looks_like_webdataset(args.source):
        print(f"vitpipe shard: error: {args.source} already holds WebDataset shards (samples with .cls/.json); "
              f"use them as they are with `vitpipe index {args.source}`", file=sys.stderr)
        return 2
    try:
        shard_dataset(args.source, args.out_url, format=args.format, name=args.name, classes=args.classes,
                      shard_size=args.shard_size, max_shard_bytes=args.max_shard_bytes, resize=args.resize,
                      quality=args.quality, exclude=args.exclude, near_dup_threshold=args.near_dup_threshold,
                      dedup_within=args.dedup_within,
                      workers=usable_cores() if args.workers is None else args.workers, seed=args.seed, strict=args.strict, validate=args.validate,
                      progress=not getattr(args, "quiet", False))
    except (ShardError, StorageError, ValueError) as err:
        print(f"vitpipe shard: error: {err}", file=sys.stderr)
        return 1
    return 0


def run_verify(args) -> int:
    from shards.verify import verify_dataset

    problems = verify_dataset(args.url, decode=not args.no_decode, progress=not getattr(args, "quiet", False))
    if problems:
        for line in problems:
            print(f"PROBLEM {line}", file=sys.stderr)
        print(f"vitpipe verify: {len(problems)} problem(s) in {args.url}", file=sys.stderr)
        return 1
    print(f"{args.url}: every shard matches the manifest")
    return 0
