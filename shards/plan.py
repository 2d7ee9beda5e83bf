"""Planning: list the source, scan every record (validate, hash), drop bad and duplicate records,
shuffle with the seed, and cut the kept records into shard tasks. Deterministic: the same source
and settings give the same plan, whatever the number of workers.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import asdict, dataclass, field

from shards import storage
from shards.dedup import HashIndex, load_exclude
from shards.imaging import DEFAULT_MAX_PIXELS, BadImage, header_probe, probe
from shards.sources import Listing, RecordRef, SourceError, list_source

_TAR_BLOCK = 512


class ShardError(RuntimeError):
    """Sharding cannot go on; the one-line message says what to fix."""


@dataclass
class ShardSettings:
    """What decides the dataset's content (the workers count does not)."""

    name: str = "data"
    shard_size: int = 10_000
    max_shard_bytes: int = 1_000_000_000
    resize: int | None = None
    quality: int = 90
    seed: int = 0
    strict: bool = False
    format: str | None = None
    classes: str | None = None
    exclude: list[str] = field(default_factory=list)
    near_dup_threshold: int = 6
    dedup_within: str = "exact"
    max_pixels: int = DEFAULT_MAX_PIXELS
    validate: str = "header"

    def __post_init__(self):
        if isinstance(self.exclude, (str, os.PathLike)):
            self.exclude = [str(self.exclude)]
        self.exclude = [str(e) for e in (self.exclude or [])]
        if not self.name or any(c in self.name for c in "./\\ {}") :
            raise ValueError(f"name={self.name!r}: use a plain name without dots, slashes, spaces or braces (e.g. 'train')")
        if self.shard_size < 1:
            raise ValueError(f"shard_size={self.shard_size}: must be >= 1 sample per shard")
        if self.max_shard_bytes < 64 * 1024:
            raise ValueError(f"max_shard_bytes={self.max_shard_bytes}: must be >= 65536")
        if self.resize is not None and self.resize < 8:
            raise ValueError(f"resize={self.resize}: shorter side must be >= 8 px (or None for pass-through)")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality={self.quality}: use 1..100")
        if self.validate not in ("header", "decode"):
            raise ValueError(f"validate={self.validate!r}: use 'header' (fast; end markers) or 'decode' (every pixel)")
        if self.dedup_within not in ("exact", "near"):
            raise ValueError(f"dedup_within={self.dedup_within!r}: use 'exact' or 'near'")
        if not 0 <= self.near_dup_threshold < 32:
            raise ValueError(f"near_dup_threshold={self.near_dup_threshold}: use 0..31 bits")


@dataclass(frozen=True, slots=True)
class Item:
    """One kept record as planned: where to read it and what to write."""

    ref: RecordRef
    label_ids: tuple[int, ...]
    ext: str
    width: int
    height: int
    nbytes: int
    sha256: str


@dataclass
class ShardTask:
    """The unit of work: write shard `name` from `items` to `url` (idempotent)."""

    index: int
    name: str
    url: str
    out_url: str
    items: list[Item]
    classes: list[str]
    multi_label: bool
    resize: int | None
    quality: int
    max_pixels: int

    @property
    def digest(self) -> str:
        h = hashlib.sha256(json.dumps([self.name, self.resize, self.quality, self.multi_label]).encode())
        for item in self.items:
            h.update(f"{item.ref.key}\0{item.sha256}\0{item.label_ids}\n".encode("utf-8"))
        return h.hexdigest()


@dataclass
class ShardPlan:
    name: str
    out_url: str
    tasks: list[ShardTask]
    classes: list[str]
    multi_label: bool
    source: dict
    settings: dict
    skipped: list[dict]
    dropped: dict
    fingerprint: str

    @property
    def shards(self) -> list[ShardTask]:
        return self.tasks

    @property
    def num_samples(self) -> int:
        return sum(len(t.items) for t in self.tasks)


# ----------------------------------------------------------------------------- scanning

def scan_records(refs: list[RecordRef], max_pixels: int, decode: bool = True) -> list[tuple]:
    """For each record: ("ok", sha256, dhash, ext, width, height, nbytes) or ("bad", kind, reason).

    `decode` decodes every image (and computes the dHash); else only headers/end markers are checked."""
    out = []
    for ref in refs:
        try:
            data = ref.read()
        except storage.StorageError as err:
            out.append(("bad", "unreadable", f"unreadable ({str(err)[:120]})"))
            continue
        except OSError as err:
            out.append(("bad", "unreadable", f"unreadable ({err.strerror or type(err).__name__})"))
            continue
        try:
            p = probe(data, max_pixels=max_pixels) if decode else header_probe(data, max_pixels=max_pixels)
        except BadImage as err:
            reason = str(err)
            kind = ("empty_file" if reason.startswith("empty") else "not_an_image" if reason.startswith(("not an image", "unsupported"))
                    else "decompression_bomb" if reason.startswith("decompression") else "corrupt_image")
            out.append(("bad", kind, reason))
            continue
        out.append(("ok", hashlib.sha256(data).hexdigest(), p.dhash, p.ext, p.width, p.height, len(data)))
    return out


def _scan_chunk(args):
    refs, max_pixels, decode = args
    return scan_records(refs, max_pixels, decode)


def _chunks(seq, size):
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def scan_all(refs: list[RecordRef], *, max_pixels: int, workers: int, decode: bool = True, progress=None) -> list[tuple]:
    results: list[tuple] = []
    chunk = 64
    if workers <= 1 or len(refs) <= chunk:
        for part in _chunks(refs, chunk):
            results.extend(scan_records(part, max_pixels, decode))
            if progress is not None:
                progress(len(part))
        return results
    from shards.workers import process_pool

    with process_pool(workers) as pool:
        for part in pool.map(_scan_chunk, [(part, max_pixels, decode) for part in _chunks(refs, chunk)]):
            results.extend(part)
            if progress is not None:
                progress(len(part))
    return results


# ----------------------------------------------------------------------------- class index

def load_class_index(spec: str) -> list[str]:
    """Classes from a dataset URL / manifest.json ("classes"), a JSON list, or a text file (one per line)."""
    spec = str(spec)
    url = spec
    if not spec.lower().endswith((".json", ".txt")) and storage.exists(storage.join(spec, "manifest.json")):
        url = storage.join(spec, "manifest.json")
    if not storage.exists(url):
        raise ShardError(f"{spec}: --classes file not found; give a dataset URL, its manifest.json, a JSON list or a .txt")
    if url.lower().endswith(".txt"):
        names = [line.strip() for line in storage.read_bytes(url).decode("utf-8-sig").splitlines() if line.strip()]
    else:
        obj = storage.read_json(url)
        names = obj.get("classes") if isinstance(obj, dict) else obj
        if not isinstance(names, list):
            raise ShardError(f"{spec}: no class list found (expected a manifest with 'classes' or a JSON list)")
        names = [str(n) for n in names]
    if len(set(names)) != len(names):
        raise ShardError(f"{spec}: the class index repeats a name; each class must appear once")
    return names


# ----------------------------------------------------------------------------- planning

def _reason_kind(reason: str) -> str:
    return "unsafe_tar_member" if reason.startswith("unsafe") else reason.split(" (")[0].replace(" ", "_")


def _sample_tar_bytes(item_bytes: int, key: str) -> int:
    pad = lambda n: (n + _TAR_BLOCK - 1) // _TAR_BLOCK * _TAR_BLOCK
    pax = 3 * 2 * _TAR_BLOCK if not key.isascii() else 0
    return 3 * _TAR_BLOCK + pad(item_bytes) + 2 * _TAR_BLOCK + pax + 512  # header+image, cls, json (+slack)


def settings_fingerprint(source_fp: str, settings: ShardSettings, exclude_fp: str) -> str:
    data = {k: v for k, v in asdict(settings).items()}
    return hashlib.sha256(json.dumps([source_fp, data, exclude_fp], sort_keys=True).encode()).hexdigest()


def plan_shards(source: str, out_url: str, *, workers: int = 1, progress: bool = False, **settings) -> ShardPlan:
    """List + scan + dedup + shuffle + split. Returns the plan; writes nothing."""
    cfg = ShardSettings(**settings)
    out_url = str(out_url) if storage.is_s3(str(out_url)) else os.path.abspath(storage._local(str(out_url)))
    try:
        listing: Listing = list_source(source, format=cfg.format)
    except SourceError as err:
        raise ShardError(str(err)) from None
    except storage.StorageError as err:
        raise ShardError(str(err)) from None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(listing.records), desc="scan", unit="img", dynamic_ncols=True)
    try:
        decode = cfg.validate == "decode" or bool(cfg.exclude) or cfg.dedup_within == "near"  # dHash needs pixels
        results = scan_all(listing.records, max_pixels=cfg.max_pixels, workers=workers, decode=decode,
                           progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    classes = load_class_index(cfg.classes) if cfg.classes else list(listing.class_names)
    class_ids = {name: i for i, name in enumerate(classes)}
    exclude = load_exclude(cfg.exclude, threshold=cfg.near_dup_threshold) if cfg.exclude else None

    skipped = [dict(s, kind=_reason_kind(s["reason"])) for s in listing.skipped]
    kept: list[Item] = []
    seen_sha: dict[str, str] = {}
    near = HashIndex(cfg.near_dup_threshold) if cfg.dedup_within == "near" else None
    for ref, res in zip(listing.records, results):
        def skip(kind, reason):
            skipped.append({"key": ref.key, "path": ref.path, "reason": reason, "kind": kind})
        if res[0] == "bad":
            skip(res[1], res[2])
            continue
        _, digest, dh, ext, width, height, nbytes = res
        unknown = [label for label in ref.labels if label not in class_ids]
        if unknown:
            skip("unknown_class", f"class {unknown[0]!r} is not in the class index (--classes)")
            continue
        if exclude is not None:
            reason = exclude.match(digest, dh)
            if reason:
                skip("excluded_exact" if reason.startswith("exact") else "excluded_near", reason)
                continue
        if digest in seen_sha:
            skip("duplicate_exact", f"exact duplicate of {seen_sha[digest]}")
            continue
        if near is not None:
            hit = near.find(dh)
            if hit is not None:
                skip("duplicate_near", f"near duplicate of {hit[0]} (dHash distance {hit[1]})")
                continue
            near.add(dh, ref.path)
        seen_sha[digest] = ref.path
        kept.append(Item(ref, tuple(sorted({class_ids[label] for label in ref.labels})), ext, width, height,
                         nbytes, digest))
    if cfg.strict and skipped:
        first = skipped[0]
        raise ShardError(f"--strict: {len(skipped)} record(s) would be skipped; first: "
                         f"{first.get('path') or first.get('key')}: {first['reason']}")
    if not kept:
        raise ShardError(f"{listing.url}: no usable images ({len(skipped)} skipped; first: "
                         f"{skipped[0]['path'] if skipped else '-'}: {skipped[0]['reason'] if skipped else '-'})")
    multi_label = listing.kind in ("jsonl", "csv") and any(len(item.label_ids) != 1 for item in kept)

    order = list(kept)
    random.Random(cfg.seed).shuffle(order)
    groups: list[list[Item]] = [[]]
    group_bytes = 1024  # end-of-archive blocks
    for item in order:
        nbytes = _sample_tar_bytes(item.nbytes, item.ref.key)
        current = groups[-1]
        if current and (len(current) >= cfg.shard_size or group_bytes + nbytes > cfg.max_shard_bytes):
            groups.append([])
            group_bytes = 1024
        groups[-1].append(item)
        group_bytes += nbytes
    tasks = []
    for index, items in enumerate(groups):
        shard_name = f"{cfg.name}-{index:06d}.tar"
        tasks.append(ShardTask(index=index, name=shard_name, url=storage.join(out_url, shard_name), out_url=out_url,
                               items=items, classes=classes, multi_label=multi_label, resize=cfg.resize,
                               quality=cfg.quality, max_pixels=cfg.max_pixels))
    settings_out = asdict(cfg)
    source = {"kind": listing.kind, "url": listing.url, "fingerprint": listing.fingerprint,
              "records": len(listing.records)}
    if exclude is not None:
        source["exclude_fingerprint"] = exclude.fingerprint
    return ShardPlan(name=cfg.name, out_url=out_url, tasks=tasks, classes=classes, multi_label=multi_label,
                     source=source, settings=settings_out, skipped=skipped,
                     dropped=dict(sorted(Counter(s["kind"] for s in skipped).items())),
                     fingerprint=settings_fingerprint(listing.fingerprint, cfg, exclude.fingerprint if exclude else ""))
