"""`vitpipe verify URL`: check every shard against the manifest.

Per shard: present, size, sha256, sample count, and every sample complete (image + json, + cls
when single-label) with a decodable image. Returns the problems, one line each (empty = good).
"""
from __future__ import annotations

import json
import tarfile

from shards import storage
from shards.format import IMAGE_EXTS, DatasetError, HashingReader, TarMembers, image_ext, split_name
from shards.imaging import BadImage, decode_check
from shards.reader import load_manifest, shard_urls


def verify_shard(url: str, entry: dict, *, multi_label: bool, decode: bool = True, foreign: bool = False,
                 skipped: frozenset = frozenset()) -> list[str]:
    """Problems of one shard. ``foreign``: shards made elsewhere (`vitpipe index`): a sample needs an image
    and a label (.cls or .json), not both; samples listed in ``skipped`` (keys) are not checked."""
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
            reader = HashingReader(raw)
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
                elif ext == "json" and not foreign:
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
        if key in skipped:
            continue
        missing = []
        if foreign:
            if image_ext(exts) is None or not exts & {"cls", "json"}:
                problems.append(f"{name}: sample {key}: no image or no label, and not listed as skipped in the manifest")
            continue
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
    foreign = manifest.get("format") == "webdataset"  # indexed by `vitpipe index`, not written here
    skipped = frozenset(s.get("key") for s in manifest.get("skipped") or [] if foreign)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(list(iterator), desc="verify", unit="shard")
    for url, entry in iterator:
        problems.extend(verify_shard(url, entry, multi_label=bool(manifest.get("multi_label")), decode=decode,
                                     foreign=foreign, skipped=skipped))
    total = sum(e["samples"] for e in entries)
    if total != manifest.get("num_samples", total):
        problems.append(f"manifest: num_samples {manifest.get('num_samples')} != sum over shards {total}")
    return problems
