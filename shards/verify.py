"""`vitpipe verify URL`: check every shard against the manifest.

Per shard: present, size, sha256, sample count, and every sample complete (image + json, + cls
when single-label) with a decodable image. Returns the problems, one line each (empty = good).
"""
from __future__ import annotations

import hashlib
import json
import tarfile

from shards import storage
from shards.format import IMAGE_EXTS, DatasetError, TarMembers, image_ext, split_name
from shards.imaging import BadImage, decode_check
from shards.reader import load_manifest, shard_urls


class _HashingReader:
    def __init__(self, stream):
        self._stream = stream
        self.digest = hashlib.sha256()
        self.bytes = 0

    def seekable(self) -> bool:
        return False  # every byte goes through the hash

    def read(self, n=-1):
        data = self._stream.read(n)
        self.digest.update(data)
        self.bytes += len(data)
        return data


def verify_shard(url: str, entry: dict, *, multi_label: bool, decode: bool = True) -> list[str]:
    problems = []
    name = entry["name"]
    try:
        actual_size = storage.size(url)
    except storage.StorageNotFound:
        return [f"{name}: missing ({url})"]
    if actual_size != entry["bytes"]:
        problems.append(f"{name}: size {actual_size} bytes, manifest says {entry['bytes']}")
    samples: dict[str, set[str]] = {}
    try:
        with storage.open_read(url) as raw:
            reader = _HashingReader(raw)
            members = TarMembers(reader)
            for member, _ in members:
                if member.startswith("/") or ".." in member.split("/"):
                    problems.append(f"{name}: unexpected tar member {member!r}")
                    continue
                key, ext = split_name(member)
                samples.setdefault(key, set()).add(ext)
                data = members.read()
                if decode and ext in IMAGE_EXTS:
                    try:
                        decode_check(data)
                    except BadImage as err:
                        problems.append(f"{name}: sample {key}: image {err}")
                elif ext == "json":
                    try:
                        meta = json.loads(data)
                        if not isinstance(meta, dict) or not isinstance(meta.get("labels"), list):
                            raise ValueError
                    except ValueError:
                        problems.append(f"{name}: sample {key}: json is not valid sample metadata")
            problems.extend(f"{name}: unexpected tar member {other!r}" for other in members.others)
            while reader.read(1 << 20):  # tar end padding counts for the checksum
                pass
    except (tarfile.TarError, OSError, EOFError) as err:
        problems.append(f"{name}: not a readable tar ({err})")
        return problems
    if reader.digest.hexdigest() != entry["sha256"]:
        problems.append(f"{name}: sha256 mismatch (content changed or corrupted)")
    if len(samples) != entry["samples"]:
        problems.append(f"{name}: {len(samples)} samples, manifest says {entry['samples']}")
    for key, exts in samples.items():
        missing = []
        if image_ext(exts) is None:
            missing.append("image")
        if "json" not in exts:
            missing.append("json")
        if not multi_label and "cls" not in exts:
            missing.append("cls")
        if missing:
            problems.append(f"{name}: sample {key}: missing {', '.join(missing)}")
    return problems


def verify_dataset(dataset_url: str, *, decode: bool = True, progress: bool = False) -> list[str]:
    """All problems found in the dataset (empty list: every shard matches the manifest)."""
    try:
        manifest = load_manifest(dataset_url)
    except (DatasetError, storage.StorageError) as err:
        return [str(err)]
    urls = shard_urls(dataset_url, manifest)
    problems = []
    entries = manifest["shards"]
    iterator = zip(urls, entries)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(list(iterator), desc="verify", unit="shard")
    for url, entry in iterator:
        problems.extend(verify_shard(url, entry, multi_label=bool(manifest.get("multi_label")), decode=decode))
    return problems
