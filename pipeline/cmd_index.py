"""`vitpipe index FOLDER_OR_PREFIX` (a manifest for WebDataset shards made elsewhere) and
`vitpipe urls DATASET` (shard URLs stock readers open without this project)."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("index", help="write manifest.json for existing WebDataset shards (no re-sharding)",
                              description="Read every .tar under URL once (samples, sha256, labels from .cls/.json) "
                                          "and write _info.json and manifest.json beside them, so `vitpipe verify` "
                                          "and training use the shards as they are.")
    p.add_argument("url", help="folder or s3://bucket/prefix holding the .tar shards")
    p.add_argument("--name", default=None, help="dataset / split name (default: the shards' common name stem)")
    p.set_defaults(func=run_index)

    u = subparsers.add_parser("urls", help="print the dataset's shard URLs for stock readers (presigned https for s3://)",
                              description="One URL per line: local paths, or for s3:// presigned https URLs that "
                                          "webdataset.WebDataset(urls) opens with curl, without this project or credentials.")
    u.add_argument("url", help="dataset folder or s3:// prefix (with manifest.json)")
    u.add_argument("--expires", type=int, default=3600, help="lifetime of presigned URLs in seconds (default 3600)")
    u.set_defaults(func=run_urls)


def run_index(args: argparse.Namespace) -> int:
    from shards.index import index_dataset

    manifest = index_dataset(args.url, name=args.name, progress=not args.quiet)
    print(f"{args.url}: {manifest['num_samples']} samples in {manifest['num_shards']} shards, "
          f"{manifest['num_classes']} classes, skipped {len(manifest['skipped'])}; manifest.json written")
    return 0


def run_urls(args: argparse.Namespace) -> int:
    from shards.describe import reader_urls

    urls = reader_urls(args.url, expires=args.expires)
    print("\n".join(urls))
    return 0
