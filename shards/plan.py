"""Planning: list the source, scan every record (validate, hash), drop bad and duplicate records,
shuffle with the seed, and cut the kept records into shard tasks. Deterministic: the same source
and settings give the same plan, whatever the number of workers.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from shards import storage
from shards.dedup import load_exclude
from shards.errors import VitpipeError
from shards.format import IMAGE_EXTS
from shards.imaging import DEFAULT_MAX_PIXELS, BadImage, header_probe, header_probe_ends, probe
from shards.order import estimate_bytes
from shards.sources import SourceError
from shards.table import RecordTable

class ShardError(VitpipeError, RuntimeError):
    """Sharding cannot go on; the one-line message says what to fix."""


class ShardSettingsError(ShardError, ValueError):
    """A shard setting is out of range; the message names it and the values it takes."""


class StrictSkipError(ShardError):
    """--strict and records that would be skipped (`skipped`: their entries, the first named)."""

    def __init__(self, skipped: list[dict]):
        self.skipped = skipped
        super().__init__(f"--strict: {len(skipped)} record(s) would be skipped; first: {self.name}: "
                         f"{skipped[0]['reason']}")

    @property
    def name(self) -> str:
        """The first record's path (or sample key)."""
        return self.skipped[0].get("path") or self.skipped[0].get("key")


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
        if not self.name or any(c in self.name for c in "./\\ {}"):
            raise ShardSettingsError(f"name={self.name!r}: use a plain name without dots, slashes, spaces or braces "
                                     "(e.g. 'train')")
        if self.shard_size < 1:
            raise ShardSettingsError(f"shard_size={self.shard_size}: must be >= 1 sample per shard")
        if self.max_shard_bytes < 64 * 1024:
            raise ShardSettingsError(f"max_shard_bytes={self.max_shard_bytes}: must be >= 65536")
        if self.resize is not None and self.resize < 8:
            raise ShardSettingsError(f"resize={self.resize}: shorter side must be >= 8 px (or None for pass-through)")
        if not 1 <= self.quality <= 100:
            raise ShardSettingsError(f"quality={self.quality}: use 1..100")
        if self.validate not in ("header", "decode"):
            raise ShardSettingsError(f"validate={self.validate!r}: use 'header' (fast; end markers) or 'decode' "
                                     "(every pixel)")
        if self.dedup_within not in ("exact", "near"):
            raise ShardSettingsError(f"dedup_within={self.dedup_within!r}: use 'exact' or 'near'")
        if not 0 <= self.near_dup_threshold < 32:
            raise ShardSettingsError(f"near_dup_threshold={self.near_dup_threshold}: use 0..31 bits")


_EXT_CODE = {e: i for i, e in enumerate(IMAGE_EXTS)}


@dataclass
class ShardTask:
    """The unit of work: write shard `name` to `url` from its rows (idempotent).

    A planned task is routed: it names the partitions' route files (`routes`), where in each its
    section lies (`spans`: one ranged read each), and `count`; `loaded()` reads them (in the writer) into a compact
    table and columns of its own. A task may also point into a shared table and scan columns
    (`rows`); pickled, it then carries only its own records."""

    index: int
    name: str
    url: str
    out_url: str
    records: RecordTable | None  # None: routed, not loaded yet
    class_ids: np.ndarray  # int32, flattened label ids per row (see class_off)
    class_off: np.ndarray | None  # int64 [n+1]; None when every row has exactly one label
    ext: np.ndarray  # uint8 codes into shards.format.IMAGE_EXTS; these five columns are indexed like `records`
    width: np.ndarray
    height: np.ndarray
    nbytes: np.ndarray
    sha: np.ndarray  # uint8 [n, 32]: content keys (see scan_records)
    classes: list[str]
    multi_label: bool
    resize: int | None
    quality: int
    max_pixels: int
    source_fingerprint: str = ""  # the listing's (paths, sizes, mtimes): part of the digest, as keys may hash only the ends
    rows: np.ndarray | None = None  # row numbers in `records` (None: records holds exactly this task's rows)
    routes: tuple = ()  # the route files of the partitions (shards.partplan), while not loaded
    spans: tuple | np.ndarray = ()  # int64 [routes, 2]: [start, stop) of its section in each route file (empty: none there)
    count: int = -1  # its records, while not loaded

    _COLUMNS = ("ext", "width", "height", "nbytes", "sha")

    def __len__(self) -> int:
        if self.records is None:
            return self.count
        return len(self.ext) if self.rows is None else len(self.rows)

    def loaded(self) -> "ShardTask":
        """This task with its records read from its routes (itself when it holds them)."""
        if self.records is not None:
            return self
        from dataclasses import replace

        from shards.partplan import load_route

        records, columns, ids, off = load_route(self)
        return replace(self, records=records, class_ids=ids, class_off=off if self.multi_label else None,
                       routes=(), spans=(), count=-1, **columns)

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.rows is not None:
            state["records"], state["rows"] = self.records.take(self.rows), None
            for name in self._COLUMNS:
                state[name] = state[name][self.rows]
        return state

    @property
    def digest(self) -> str:
        if self.records is None:
            return self.loaded().digest
        h = hashlib.sha256(json.dumps([self.name, self.resize, self.quality, self.multi_label,
                                       self.source_fingerprint]).encode())
        rows = range(len(self)) if self.rows is None else self.rows.tolist()
        paths = self.records.paths_of(rows)
        for strings in (paths, self.records.keys_of(rows, paths)):  # keys as written, stored or derived
            h.update("\0".join(strings).encode("utf-8", "surrogatepass"))
        h.update((self.sha if self.rows is None else self.sha[self.rows]).tobytes())
        h.update(self.class_ids.astype("<i4").tobytes())
        off = np.arange(len(self) + 1) if self.class_off is None else self.class_off
        h.update(off.astype("<i8").tobytes())
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
    label_histogram: list[int] = field(default_factory=list)
    split: object = None  # the shards.partitions.SourceSplit it was planned from
    scan_args: tuple = ()
    units_reused: int = 0  # units whose scan came from their record (a re-run)
    ext_codes: list = field(default_factory=list)  # the kept records' extensions (codes into IMAGE_EXTS)

    @property
    def shards(self) -> list[ShardTask]:
        return self.tasks

    @property
    def num_samples(self) -> int:
        return sum(len(t) for t in self.tasks)


# ----------------------------------------------------------------------------- scanning

class ScanResults:
    """Per-record scan outcome in arrays; reasons only for the bad ones."""

    def __init__(self, n: int, decode: bool = True, stats: bool = False):
        # stats: each file's size and mtime as the scan found them (-1 where it could not open it), for
        # the fingerprint of a listing made without them (sources.Listing.complete_fingerprint)
        self.file_size = np.full(n, -1, dtype=np.int64) if stats else None
        self.mtime = np.full(n, -1.0, dtype=np.float64) if stats else None
        self.ok = np.zeros(n, dtype=bool)
        self.sha = np.zeros((n, 32), dtype=np.uint8)
        self.dhash = np.zeros(n, dtype=np.uint64) if decode else None  # perceptual hashes need pixels
        self.ext = np.zeros(n, dtype=np.uint8)
        self.width = np.zeros(n, dtype=np.int32)
        self.height = np.zeros(n, dtype=np.int32)
        self.nbytes = np.zeros(n, dtype=np.int64)
        self.bad: dict[int, tuple[str, str]] = {}
        self.filled = n  # rows in use (extend() grows the columns ahead of it)

    def put(self, i: int, result: tuple) -> None:
        if result[0] == "bad":
            self.bad[i] = (result[1], result[2])
            return
        _, digest, dh, ext, width, height, nbytes = result
        self.ok[i] = True
        self.sha[i] = np.frombuffer(digest, dtype=np.uint8)
        if self.dhash is not None:
            self.dhash[i] = dh or 0
        self.ext[i] = _EXT_CODE[ext]
        self.width[i], self.height[i], self.nbytes[i] = width, height, nbytes

    _COLUMNS = ("ok", "sha", "dhash", "ext", "width", "height", "nbytes", "file_size", "mtime")

    def put_part(self, start: int, part: "ScanResults") -> None:
        """Take the results of rows start.. from `part` (a ScanResults of those rows)."""
        stop = start + len(part.ok)
        for name in self._COLUMNS:
            column = getattr(self, name)
            if column is not None:
                column[start:stop] = getattr(part, name)
        self.bad.update((start + i, reason) for i, reason in part.bad.items())

    def extend(self, part: "ScanResults") -> None:
        """Append `part`'s rows. The columns grow in place (realloc: the rows so far are not copied into
        a second set of columns); trim() cuts them to the rows once all are in."""
        start = self.filled
        self.filled = stop = start + len(part.ok)
        if stop > len(self.ok):  # by an eighth: what is zeroed ahead stays small
            self._resize(max(stop, len(self.ok) + len(self.ok) // 8 + 1024))
        self.put_part(start, part)

    def trim(self) -> None:
        self._resize(self.filled)

    def _resize(self, n: int) -> None:
        for name in self._COLUMNS:
            column = getattr(self, name)
            if column is not None and len(column) != n:
                column.resize((n, *column.shape[1:]), refcheck=False)  # owns its data: nothing else views it

    def rows(self, start: int, stop: int) -> "ScanResults":
        """A copy of rows start..stop-1."""
        out = ScanResults(0, self.dhash is not None)
        for name in self._COLUMNS:
            column = getattr(self, name)
            setattr(out, name, None if column is None else column[start:stop].copy())
        out.filled = stop - start
        out.bad = {i - start: reason for i, reason in self.bad.items() if start <= i < stop}
        return out

    def columns(self) -> dict:
        """The results as arrays only (a scan record; see ScanResults.from_columns)."""
        out = {name: getattr(self, name) for name in self._COLUMNS if getattr(self, name) is not None}
        bad = sorted((i, kind, reason) for i, (kind, reason) in self.bad.items())
        out["bad"] = np.frombuffer(json.dumps(bad).encode(), dtype=np.uint8)
        return out

    @classmethod
    def from_columns(cls, arrays: dict) -> "ScanResults":
        out = cls(0, "dhash" in arrays)
        for name in cls._COLUMNS:
            setattr(out, name, arrays.get(name))
        out.filled = len(out.ok)
        out.bad = {i: (kind, reason) for i, kind, reason in json.loads(arrays["bad"].tobytes())}
        return out


# The content key of a record read only at its ends (pass-through scans): sha256 of its size, its
# first and its last _KEY_ENDS bytes. Identical files get identical keys, so every exact duplicate is
# found among the records sharing a key; those few are then hashed whole to confirm (plan_shards).
_KEY_ENDS = 1024
_HEAD_READ = 16384  # read at the start: JPEG/PNG headers (and a file this small, whole)


def content_key(data: bytes) -> bytes:
    return _ends_key(len(data), data[:_KEY_ENDS], data[max(_KEY_ENDS, len(data) - _KEY_ENDS):])


def _ends_key(size: int, head: bytes, tail: bytes) -> bytes:
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    digest.update(head)
    digest.update(tail)
    return digest.digest()


def _bad_image(err: BadImage) -> tuple:
    reason = str(err)
    kind = ("empty_file" if reason.startswith("empty") else "not_an_image" if reason.startswith(("not an image", "unsupported"))
            else "decompression_bomb" if reason.startswith("decompression") else "corrupt_image")
    return ("bad", kind, reason)


def _unreadable(err: Exception) -> tuple:
    if isinstance(err, storage.StorageError):
        return ("bad", "unreadable", f"unreadable ({str(err)[:120]})")
    return ("bad", "unreadable", f"unreadable ({err.strerror or type(err).__name__})")


_WHOLE = 1 << 62  # read_ends head: all of it


def _scan_one(url: str, offset: int, length: int, max_pixels: int, decode: bool) -> tuple[tuple, int, float]:
    """(result, size, mtime): scan_records' result for one record, and the size and mtime of the
    file as it was open (a local whole file; else -1, -1.0)."""
    data, size, mtime = None, -1, -1.0
    # a local record: its ends (header mode; they settle most JPEGs and PNGs) or all of it (decode)
    ends = storage.read_ends(url, _WHOLE if decode else _HEAD_READ, 0 if decode else _KEY_ENDS,
                             None if offset < 0 else offset, None if offset < 0 else length)
    if ends is not None:
        head, tail, size, stamp = ends
        mtime = -1.0 if stamp is None else stamp
        if size == len(head):  # small, or decode mode: that is all of it
            data = head
        elif len(head) == _HEAD_READ and len(tail) == _KEY_ENDS:
            try:
                p = header_probe_ends(head, tail, size, max_pixels=max_pixels)
            except BadImage as err:  # a header that declares too many pixels
                return _bad_image(err), size, mtime
            if p is not None:
                return ("ok", _ends_key(size, head[:_KEY_ENDS], tail), None, p.ext, p.width, p.height, size), size, mtime
    if data is None:
        data = storage.read_record(url, offset, length)
    try:
        p = probe(data, max_pixels=max_pixels) if decode else header_probe(data, max_pixels=max_pixels)
    except BadImage as err:
        return _bad_image(err), size, mtime
    key = hashlib.sha256(data).digest() if decode else content_key(data)
    return ("ok", key, p.dhash, p.ext, p.width, p.height, len(data)), size, mtime


def _scan_with_stats(locations, max_pixels: int, decode: bool) -> list[tuple[tuple, int, float]]:
    if locations and storage.is_s3(locations[0][0]):  # a few requests in flight
        return storage.map_reads(lambda location: _scan_guarded(*location, max_pixels, decode), locations,
                                 locations[0][0])
    return [_scan_guarded(url, offset, length, max_pixels, decode) for url, offset, length in locations]


def _scan_guarded(url: str, offset: int, length: int, max_pixels: int, decode: bool) -> tuple[tuple, int, float]:
    try:
        return _scan_one(url, offset, length, max_pixels, decode)
    except (storage.StorageError, OSError) as err:
        return _unreadable(err), -1, -1.0


def scan_records(locations, max_pixels: int, decode: bool = True) -> list[tuple]:
    """For each (url, offset, length): ("ok", key, dhash, ext, width, height, nbytes) or ("bad", kind, reason).

    `decode`: decode every image (and compute the dHash); the key is the sha256 of the bytes. Else
    only headers and end markers are checked, reading just the ends of the record where they
    settle it, and the key is content_key (see _KEY_ENDS)."""
    return [result for result, _, _ in _scan_with_stats(locations, max_pixels, decode)]


def _scan_part(locations, max_pixels: int, decode: bool, stats: bool) -> ScanResults:
    """The scan of a chunk, as the arrays of a ScanResults (what a worker sends back: a few
    arrays, not a tuple per record), through _scan_one."""
    part = ScanResults(len(locations), decode, stats)
    scanned = _scan_with_stats(locations, max_pixels, decode)
    results = [result for result, _, _ in scanned]
    if stats:
        part.file_size[:] = [size for _, size, _ in scanned]
        part.mtime[:] = [mtime for _, _, mtime in scanned]
    ok = [i for i, result in enumerate(results) if result[0] == "ok"]
    part.bad = {i: result[1:] for i, result in enumerate(results) if result[0] == "bad"}
    results = [result for result in results if result[0] == "ok"]
    if ok:
        _, keys, dhashes, exts, widths, heights, sizes = zip(*results)
        part.ok[ok] = True
        part.sha[ok] = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(ok), 32)
        if decode:
            part.dhash[ok] = [d or 0 for d in dhashes]
        part.ext[ok] = [_EXT_CODE[e] for e in exts]
        part.width[ok], part.height[ok], part.nbytes[ok] = widths, heights, sizes
    return part


def hash_records(locations) -> list[bytes | tuple]:
    """For each (url, offset, length): the sha256 of its bytes, or ("bad", "unreadable", reason)."""
    out = []
    for url, offset, length in locations:
        try:
            out.append(hashlib.sha256(storage.read_record(url, offset, length)).digest())
        except (storage.StorageError, OSError) as err:
            out.append(_unreadable(err))
    return out


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


def settings_fingerprint(source_fp: str, settings: ShardSettings, exclude_fp: str) -> str:
    data = {k: v for k, v in asdict(settings).items()}
    return hashlib.sha256(json.dumps([source_fp, data, exclude_fp], sort_keys=True).encode()).hexdigest()


def _first_copies(keys: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """For each row, the row of the first row (in listing order) with the same key (`keys`: uint8
    [n, 32]); itself when it is the first or not `ok`. Groups by the first 8 bytes (a 1-D sort,
    little memory), then confirms all 32."""
    n = len(ok)
    rows = np.arange(n)
    if not n:
        return rows
    prefix = np.ascontiguousarray(keys[:, :8]).view(np.uint64).ravel()
    _, inverse = np.unique(prefix, return_inverse=True)
    del prefix
    inverse = inverse.ravel()
    first = np.full(int(inverse.max()) + 1, n, dtype=np.int64)
    np.minimum.at(first, inverse, np.where(ok, rows, n))  # bad records never count as "first"
    first_of = np.where(ok, first[inverse], rows)
    del first, inverse
    candidates = np.flatnonzero(first_of != rows)
    clash = candidates[(keys[candidates] != keys[first_of[candidates]]).any(axis=1)]
    first_of[clash] = clash  # same 64-bit prefix, different key: not a duplicate (astronomically rare)
    return first_of


def _non_ascii(keys, paths) -> np.ndarray:
    """Per row: does its key hold non-ASCII characters (a key stored empty is derived from the path,
    so the path decides)."""
    def flags(strings, rows_with_text):
        off = np.frombuffer(strings.off, dtype=np.uint64).astype(np.int64)
        data = np.frombuffer(strings.buf, dtype=np.uint8)  # a view, released on return
        out = np.zeros(len(off) - 1, dtype=bool)
        starts = off[:-1][rows_with_text]  # empty strings add no bytes, so skipping them keeps segments right
        if len(starts):
            out[rows_with_text] = np.maximum.reduceat(data, starts) >= 128
        return out
    n = len(paths.off) - 1
    if keys is None:
        return flags(paths, np.ones(n, dtype=bool))
    stored = np.diff(np.frombuffer(keys.off, dtype=np.uint64).astype(np.int64)) > 0
    return np.where(stored, flags(keys, stored), flags(paths, np.ones(len(stored), dtype=bool)))


def _estimates(table: RecordTable, nbytes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """shards.order.estimate_bytes of `rows` (int64 [len(rows)])."""
    path_off = np.frombuffer(table.paths.off, dtype=np.uint64).astype(np.int64)
    path_len = path_off[rows + 1] - path_off[rows]
    non_ascii = _non_ascii(table.keys, table.paths)[rows] if len(rows) else np.zeros(0, bool)
    return estimate_bytes(nbytes[rows], path_len, non_ascii)


def default_partitions(workers: int) -> int:
    """Partitions to cut a source into for `workers` workers: a few each (an even finish)."""
    return 4 * max(1, workers)


def scan_setup(cfg: ShardSettings):
    """(scan_args (max_pixels, decode), the exclude index or None) of the settings."""
    decode = cfg.validate == "decode" or bool(cfg.exclude) or cfg.dedup_within == "near"  # dHash needs pixels
    return (cfg.max_pixels, decode), load_exclude(cfg.exclude, threshold=cfg.near_dup_threshold) if cfg.exclude else None


def shard_tasks(cfg: ShardSettings, out_url: str, planned, first: int = 0) -> list[ShardTask]:
    """The routed tasks of a plan's shards (shards.partplan.Planned), numbered from `first`."""
    tasks, routes = [], tuple(planned.routes)  # one tuple, and views of one spans array, shared by the tasks
    for index, (lo, hi) in enumerate(planned.bounds, first):
        shard_name = f"{cfg.name}-{index:06d}.tar"
        tasks.append(ShardTask(index=index - first, name=shard_name, url=storage.join(out_url, shard_name),
                               out_url=out_url, records=None, class_ids=None, class_off=None, ext=None, width=None,
                               height=None, nbytes=None, sha=None, classes=planned.classes,
                               multi_label=planned.multi_label, resize=cfg.resize, quality=cfg.quality,
                               max_pixels=cfg.max_pixels, source_fingerprint=planned.listing.fingerprint,
                               routes=routes, spans=planned.spans[:, index - first:index - first + 2],
                               count=hi - lo))
    return tasks


def plan_shards(source: str, out_url: str, *, workers: int = 1, progress: bool = False, pool=None,
                partitions: int | None = None, **settings) -> ShardPlan:
    """List + scan + dedup + shuffle + split, partition by partition (shards.partplan). Returns the
    plan; writes nothing but the partitions' scan records, state and route files in `<out>/_plan/`
    (the tasks read their records from the routes). `pool`: an executor to run the partitions' jobs
    in (else one of `workers` processes is made for it). `partitions`: how many to cut the source
    into (default: default_partitions); the plan does not depend on it."""
    from shards.partitions import attach_records, split_source
    from shards.partplan import plan_partitions

    cfg = ShardSettings(**settings)
    out_url = storage.normalize(out_url)
    cores = pool._max_workers if pool is not None else workers
    try:
        split = split_source(source, format=cfg.format, partitions=partitions or default_partitions(cores))
    except SourceError as err:
        raise ShardError(str(err)) from None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc="list+scan", unit="img", dynamic_ncols=True)
    scan_args, exclude = scan_setup(cfg)

    def classes_of(listing) -> list[str]:
        return load_class_index(cfg.classes) if cfg.classes else list(listing.class_names)

    try:
        attach_records(split, out_url, scan_args)
        planned = plan_partitions(split, cfg, scan_args, out_url, classes_of, exclude, pool=pool, workers=workers,
                                  progress=None if bar is None else bar.update)
    except (SourceError, storage.StorageError) as err:
        raise ShardError(str(err)) from None
    finally:
        if bar is not None:
            bar.close()
    if progress and planned.reused:
        print(f"plan: {planned.reused} unit(s) of the source (class folders, tars, manifest blocks) taken from their "
              "scan records instead of scanned again")
    listing, skipped = planned.listing, planned.skipped
    tasks = shard_tasks(cfg, out_url, planned)
    source = {"kind": listing.kind, "url": listing.url, "fingerprint": listing.fingerprint,
              "records": len(listing.records)}
    if exclude is not None:
        source["exclude_fingerprint"] = exclude.fingerprint
    return ShardPlan(name=cfg.name, out_url=out_url, tasks=tasks, classes=planned.classes,
                     multi_label=planned.multi_label, source=source, settings=asdict(cfg), skipped=skipped,
                     dropped=dict(sorted(Counter(s["kind"] for s in skipped).items())),
                     fingerprint=settings_fingerprint(listing.fingerprint, cfg, exclude.fingerprint if exclude else ""),
                     label_histogram=planned.histogram, split=split, scan_args=scan_args,
                     units_reused=planned.reused, ext_codes=planned.exts)
