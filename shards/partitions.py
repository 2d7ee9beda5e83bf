"""Partitioned listing and scanning: the source is cut into partitions that workers list and scan
themselves (a Dask cluster's, or local processes).

Units are the source's own pieces, in listing order: the class folders of a tree (local or S3 key
prefixes, after the files lying in its root), the tars of a folder of per-synset tars, runs of
whole lines of a jsonl manifest (cut at a newline every `_MANIFEST_BLOCK` bytes). A partition is
a run of consecutive units. Each unit adds its share to the listing's fingerprint, so the
records, their order and the fingerprint are those of one listing of the whole source, however
many partitions there are; the plan made from them (and so every shard's bytes) is the same for
any number of partitions and workers. A csv manifest and a tar of tars are one unit each.

The scans of a partition's units are kept as a record in the destination (`_plan/*.npz`, see
attach_records) until the dataset is complete: a planner killed mid-plan (or a worker killed
mid-partition) re-lists the units (cheap) and takes the scan of each whose listing is unchanged
from a record instead of reading its images again, whatever the partitions are this time.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass, field

import numpy as np

from shards import storage
from shards.sources import (Listing, SourceError, _add_folder_runs, _Fingerprint, _index_tar_job, _list_tars,
                            _local_folder, _local_folders, _s3_folders, _stat_or_missing, _TarJob, add_manifest_rows,
                            deferred_entries, source_kind, tar_steps)
from shards.table import RecordTable

PLAN_DIR = "_plan"  # in the destination: one scan record per partition while the dataset is being made
_MANIFEST_BLOCK = 16 << 20  # a jsonl manifest is cut into units of about this many bytes (whole lines)


@dataclass
class Partition:
    index: int
    kind: str
    url: str
    units: tuple  # imagefolder: folder names ("": the root's own files); i21k-tars: steps; jsonl: (start, stop, line)
    first: int = 0  # the index of its first unit in the source's
    records: tuple = ()  # scan records (urls) of earlier runs that hold some of its units (see attach_records)
    listings: tuple = ()  # its units' list_unit(stats=False), if listed already (shards.windows); else the scan lists


@dataclass
class SourceSplit:
    """What the coordinator keeps of a source: its partitions, and what it listed itself."""

    kind: str
    url: str
    partitions: list[Partition]
    head: bytes = b""  # the fingerprint's entries before the partitions' (a tars folder's tars; a manifest's hash)
    class_files: dict = field(default_factory=dict)  # class folders seen at the top (a local tree's empty ones count)
    class_names: list[str] = field(default_factory=list)  # a tars folder's synsets


@dataclass
class PartListing:
    records: RecordTable
    skipped: list[dict]
    fp: bytes | None  # the partition's share of the fingerprint's bytes; None: `fingerprint` is the whole one
    fingerprint: str = ""
    class_files: dict = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    runs: list | None = None  # listed by names alone (list_unit(stats=False)): fp is made by complete()

    def complete(self, sizes=None, mtimes=None) -> None:
        """Make the fingerprint's share of a listing made by names alone, from each record's size and
        mtime (arrays by row, as the scan found them; None: stated now)."""
        if self.runs is None:
            return
        if sizes is None:
            stats = [_stat_or_missing(self.records.url(i)) for i in range(len(self.records))]
            sizes, mtimes = (np.array([st[j] for st in stats]) for j in (0, 1))
        entries = _Fingerprint(None)
        deferred_entries(self.records, self.runs, sizes, mtimes, entries)
        self.fp, self.runs = bytes(entries.data), None

    def digest(self) -> str:
        """What a scan record is checked against: the listing (paths, offsets, sizes and mtimes)."""
        h = hashlib.sha256(self.fp if self.fp is not None else self.fingerprint.encode())
        h.update(bytes(self.records.paths.buf))
        h.update(self.records.offset.tobytes() + self.records.length.tobytes())
        h.update(json.dumps(self.skipped, sort_keys=True).encode())
        return h.hexdigest()


def split_source(url: str, *, format: str | None = None, partitions: int = 1) -> SourceSplit:
    """The source's units, grouped into about `partitions` partitions (one LIST of the top level,
    or one read of a jsonl manifest; no image is read). Raises SourceError as list_source does."""
    url, kind = source_kind(url, format)
    out = SourceSplit(kind, url, [])
    if kind == "imagefolder":
        units = _folder_units(url, out)
    elif kind == "i21k-tars" and not (url.lower().endswith(".tar") and not storage.isdir(url)):
        units = _tar_units(url, out)
    elif kind == "jsonl":
        units = _manifest_units(url, out)
    else:  # a csv manifest, a tar of tars: one unit
        units = [None]
    if not units:  # a jsonl manifest without a line
        raise SourceError(f"{url}: empty manifest (no records)")
    per = -(-len(units) // max(1, min(partitions, len(units))))
    out.partitions = [Partition(i, kind, url, tuple(units[lo:lo + per]), lo) for i, lo in enumerate(range(0, len(units), per))]
    return out


def _folder_units(url: str, out: SourceSplit) -> list:
    if storage.is_s3(url):
        bucket, key = storage.split(url)
        strip = len(key.rstrip("/") + "/") if key else 0
        from shards.storage.s3 import _iter_objects

        folders = [item["Prefix"][strip:].rstrip("/") for item in _iter_objects(url, delimiter="/") if "Prefix" in item]
        return [""] + sorted(folders, key=lambda name: name + "/")  # key order, as a LIST gives the files
    top = storage.as_local_path(url)
    if not os.path.isdir(top):
        raise SourceError(f"{url}: not a folder")
    with os.scandir(top) as it:
        entries = list(it)
    out.class_files = {e.name: 0 for e in entries if not e.name.startswith(".") and os.path.isdir(e.path)}
    # walked as os.walk does: sorted, links to folders left out
    return [""] + sorted(e.name for e in entries if e.is_dir() and not e.is_symlink())


def _tar_units(url: str, out: SourceSplit) -> list:
    entries = _Fingerprint(None)
    steps = tar_steps(url, entries)
    out.head, out.class_names = bytes(entries.data), sorted({s.synset for s in steps if isinstance(s, _TarJob)})
    return steps


def _manifest_units(url: str, out: SourceSplit) -> list:
    """(start, stop, first line) of runs of whole lines, and the manifest's hash (one streamed read)."""
    digest, units, start, line, carry = hashlib.sha256(), [], 0, 1, b""
    with storage.open_read(url) as f:
        while True:
            block = f.read(_MANIFEST_BLOCK)
            digest.update(block)
            data = carry + block
            cut = data.rfind(b"\n") + 1 if block else len(data)
            if cut:
                text = data[:cut].decode("utf-8-sig" if start == 0 else "utf-8", "replace")
                units.append((start, start + cut, line))
                start, line = start + cut, line + len(text.splitlines())
            carry = data[cut:]
            if not block:
                break
    entries = _Fingerprint(None)
    entries.append([storage.basename(url), digest.hexdigest()])
    out.head = bytes(entries.data)
    return units


def list_unit(kind: str, url: str, unit, *, stats: bool = True) -> PartListing:
    """List one unit of a source (in a worker: no image is read). `stats` False: the files of a local
    class folder are listed by names alone (a stat per file is most of the cost of listing, far more
    on a network file system); then the scan's sizes and mtimes complete it (PartListing.complete)."""
    try:
        return _list_unit(kind, url, unit, stats)
    except storage.StorageError as err:
        raise SourceError(str(err)) from None
    except UnicodeEncodeError:  # a name the OS gave as undecodable bytes: the whole listing's message
        from shards.sources import list_source

        list_source(url, format=kind)
        raise


def _list_unit(kind: str, url: str, unit, stats: bool) -> PartListing:
    records, skipped, entries = RecordTable(), [], _Fingerprint(None)
    if kind == "imagefolder":
        s3 = storage.is_s3(url)
        root = url.rstrip("/") if s3 else url.rstrip(os.sep)
        deferred = None if s3 or stats else []  # an S3 listing has the sizes and mtimes anyway
        class_files: dict = {}
        if unit:
            runs = (_s3_folders(storage.join(url, unit), root) if s3
                    else _local_folders(os.path.join(root, unit), root, stat=deferred is None))
        else:
            runs = _root_files(url, root, s3, stat=deferred is None)
        _add_folder_runs(runs, root, records, skipped, entries, class_files, deferred)
        return PartListing(records, skipped, bytes(entries.data), class_files=class_files, runs=deferred)
    if kind == "jsonl":
        start, stop, line = unit
        text = storage.read_range(url, start, stop - start).decode("utf-8-sig" if start == 0 else "utf-8")
        add_manifest_rows(url, kind, text, records, entries, first_line=line)
        return PartListing(records, skipped, bytes(entries.data))
    if kind == "i21k-tars" and unit is not None:  # a step of a folder of tars
        if isinstance(unit, dict):
            return PartListing(records, [unit], b"")
        records, skipped = _index_tar_job(unit)
        if not len(records):
            raise SourceError(f"{unit.url}: class tar has no images; remove it or fix the tar")
        return PartListing(records, skipped, b"")
    # one unit: a csv manifest or a tar of tars, listed whole
    from shards.sources import _list_manifest

    listing = _list_manifest(url, kind) if kind == "csv" else _list_tars(url, kind)
    return PartListing(listing.records, listing.skipped, None, listing.fingerprint, class_names=listing.class_names)


def _concat(listings: list[PartListing]) -> PartListing:
    """The listing of consecutive units as one."""
    if len(listings) == 1:
        return listings[0]
    records, skipped, fp, class_files = RecordTable(), [], bytearray(), {}
    for unit in listings:
        records.extend(unit.records)
        skipped.extend(unit.skipped)
        fp += unit.fp
        for name, count in unit.class_files.items():
            class_files[name] = class_files.get(name, 0) + count
    return PartListing(records, skipped, bytes(fp), class_files=class_files)


def _root_files(url: str, root: str, s3: bool, stat: bool = True):
    """The run of the files lying in the root of a tree (not records: each is a skip)."""
    if s3:
        bucket, key = storage.split(url)
        strip = len(key.rstrip("/") + "/") if key else 0
        from shards.storage.s3 import _iter_objects

        items = [item for item in _iter_objects(url, delimiter="/") if "Key" in item]
        if items:
            yield ("", [item["Key"][strip:] for item in items], [int(item["Size"]) for item in items],
                   [item["LastModified"].timestamp() for item in items])
        return
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield from _local_folder(root, fd, root, stat)
    finally:
        os.close(fd)


def merge(split: SourceSplit, parts) -> Listing:
    """One Listing from the partitions' listings (in order): the same as list_source's."""
    parts = iter(parts)
    if split.kind in ("csv",) or split.partitions[0].units == (None,):
        only = next(parts)
        listing = Listing(split.kind, split.url, only.records, only.skipped, only.fingerprint, only.class_names)
    else:
        digest = _Fingerprint(split.kind)
        digest.update(split.head)
        records = None  # the first part's table, extended by the others as they come (each part freed after)
        skipped, class_files = [], dict(split.class_files)
        for part in parts:
            digest.update(part.fp)
            if records is None:
                records = part.records
            else:
                records.extend(part.records)
            skipped.extend(part.skipped)
            for name, count in part.class_files.items():
                class_files[name] = class_files.get(name, 0) + count
        names = split.class_names if split.kind == "i21k-tars" else sorted(records.label_names)
        if split.kind == "imagefolder":
            empty = sorted(c for c, n in class_files.items() if n == 0)
            if empty:
                raise SourceError(f"{storage.join(split.url, empty[0])}: class folder has no images; add images or "
                                  "remove the folder" + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""))
            if not class_files:
                raise SourceError(f"{split.url}: no class folders; an imagefolder source is ROOT/<class>/<image>")
            names = sorted(class_files)
        elif split.kind == "jsonl" and not len(records):
            raise SourceError(f"{split.url}: empty manifest (no records)")
        listing = Listing(split.kind, split.url, records, skipped, digest.hexdigest(), names)
    if not len(listing.records) and not listing.skipped:
        raise SourceError(f"{split.url}: empty source (no images found as {split.kind})")
    listing.records.make_keys_unique()
    return listing


def source_listing(url: str, *, format: str | None = None) -> Listing:
    """The whole source listed through its partitions, in this process."""
    split = split_source(url, format=format)
    return merge(split, (_concat([list_unit(split.kind, split.url, unit) for unit in part.units])
                         for part in split.partitions))


# ----------------------------------------------------------------------------- scanning a partition

_RECORD_ROWS = 100_000  # a partition's scans are saved at least every this many rows (a killed worker loses less)


def _scan_id(kind: str, url: str, scan_args: tuple) -> str:
    return hashlib.sha256(repr((kind, url, scan_args)).encode()).hexdigest()[:16]


def _unit_key(unit) -> bytes:
    return hashlib.sha256(repr(unit).encode()).hexdigest()[:32].encode()


def attach_records(split: SourceSplit, out_url: str, scan_args: tuple) -> int:
    """Give each partition the scan records of earlier runs that hold some of its units (one listing
    of `<out>/_plan`; a record is named `<scan id>-<first unit>-<last unit>.npz`, by the units'
    indices in the source, so records made with other partitions still count). Returns how many
    records there are."""
    folder = storage.join(out_url, PLAN_DIR)
    if not storage.exists(folder):
        return 0
    prefix, spans = _scan_id(split.kind, split.url, scan_args) + "-", []
    for item in storage.iter_files(folder):
        name = storage.basename(item["url"])
        first, _, last = name[len(prefix):].removesuffix(".npz").partition("-")
        if name.startswith(prefix) and name.endswith(".npz") and first.isdigit() and last.isdigit():
            spans.append((int(first), int(last), item["url"]))
    for part in split.partitions:
        part.records = tuple(url for first, last, url in spans
                             if first < part.first + len(part.units) and last >= part.first)
    return len(spans)


def scan_partition(part: Partition, scan_args: tuple, out_url: str):
    """(listing, scan results, units reused) of a partition: scan_units' in one (what a worker sends
    back)."""
    from shards.plan import ScanResults

    listings, scans, reused = [], [], 0
    for listing, scan, was_reused in scan_units(part, scan_args, out_url):
        listings.append(listing)
        scans.append(scan)
        reused += was_reused
    if len(scans) == 1:
        return listings[0], scans[0], reused
    scan = ScanResults(0, scan_args[1])
    for unit_scan in scans:
        scan.extend(unit_scan)
    scan.trim()
    return _concat(listings), scan, reused


def scan_units(part: Partition, scan_args: tuple, out_url: str):
    """Yields (listing, scan results, reused) for each unit of the partition: its listing (made now, or
    carried in part.listings), then its scan taken from a record of an earlier run when the listing
    is unchanged, else made (`scan_args`: max_pixels, decode). The units scanned are saved as records
    (one per partition, or per _RECORD_ROWS rows), each holding its units' scans by unit, so a re-run
    with other partitions still finds them."""
    from shards.plan import _scan_part

    saved = _load_records(part.records)
    scan_id = _scan_id(part.kind, part.url, scan_args)
    fresh, rows = [], 0
    for index, unit, listing in zip(range(part.first, part.first + len(part.units)), part.units,
                                    part.listings or [None] * len(part.units)):
        if listing is None:
            listing = list_unit(part.kind, part.url, unit, stats=False)
        key, scan = _unit_key(unit), None
        if key in saved:
            listing.complete()  # stated now: a record counts only for the same files
            digest, scan = saved.pop(key)
            scan = scan if digest == listing.digest() else None
        reused = scan is not None
        if scan is None:
            records = listing.records
            scan = _scan_part(records.locations(range(len(records))), *scan_args, listing.runs is not None)
            listing.complete(scan.file_size, scan.mtime)  # the sizes and mtimes of the files the scan opened
            scan.file_size = scan.mtime = None
            if len(records):
                fresh.append((index, key, listing.digest(), scan))
                rows += len(records)
            if rows >= _RECORD_ROWS:
                _write_record(out_url, scan_id, fresh)
                fresh, rows = [], 0
        yield listing, scan, reused
    _write_record(out_url, scan_id, fresh)


def _write_record(out_url: str, scan_id: str, units: list) -> None:
    """One record of the scans of `units` [(index, key, listing digest, scan)]: an .npz of their
    scans' columns end to end (no pickle: a record is data only)."""
    if not units:
        return
    from shards.plan import ScanResults

    whole = ScanResults(0, units[0][3].dhash is not None)
    for *_, scan in units:
        whole.extend(scan)
    whole.trim()
    name = f"{scan_id}-{units[0][0]:08d}-{units[-1][0]:08d}.npz"
    write_arrays(storage.join(out_url, PLAN_DIR, name),
                 {"unit_keys": np.array([key for _, key, _, _ in units], dtype="S32"),
                  "digests": np.array([digest.encode() for _, _, digest, _ in units], dtype="S64"),
                  "rows": np.array([len(scan.ok) for *_, scan in units], dtype=np.int64), **whole.columns()})


def pack_arrays(arrays: dict, file=None) -> bytes | None:
    """The form of every file in `_plan/`: an .npz of arrays (no pickle; read with unpack_arrays),
    written member by member to `file` (a binary file) if given, else returned."""
    if file is not None:
        np.savez(file, **arrays)
        return None
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def write_arrays(url: str, arrays: dict) -> dict:
    """Write pack_arrays' file of `arrays` at `url` (not fsynced), streamed member by member
    (storage.write_with), never whole in memory; returns its array_spans."""
    spans = {}

    def write(file):
        pack_arrays(arrays, file)
        spans.update(array_spans(file))
    storage.write_with(url, write, durable=False)
    return spans


def unpack_arrays(data: bytes) -> dict:
    """{name: array} of pack_arrays' bytes; a pickled array is refused (ValueError)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def array_spans(data) -> dict:
    """{name: (start, stop)}: where each array's data lies in pack_arrays' bytes or file `data` (members
    are stored, not compressed), so that a reader can fetch a part of one array with a ranged read.
    Only the headers are read."""
    spans, file = {}, io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    with zipfile.ZipFile(file) as archive:
        for info in archive.infolist():
            file.seek(info.header_offset + 26)
            sizes = file.read(4)
            start = info.header_offset + 30 + int.from_bytes(sizes[:2], "little") + int.from_bytes(
                sizes[2:], "little")  # the local header: fixed part, name, extra field
            file.seek(start)
            npy = io.BytesIO(file.read(min(info.file_size, 1 << 16)))  # its header, not a copy of it all
            version = np.lib.format.read_magic(npy)
            (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(npy)
            spans[info.filename.removesuffix(".npy")] = (start + npy.tell(), start + info.file_size)
    return spans


def _load_records(urls) -> dict:
    """{unit key: (listing digest, scan)} from the records at `urls` (one cut short or unreadable
    counts as absent: its units are scanned again)."""
    from shards.plan import ScanResults

    saved = {}
    for url in urls:
        try:
            arrays = unpack_arrays(storage.read_bytes(url))
            whole, start = ScanResults.from_columns(arrays), 0
        except (storage.StorageError, OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
            continue
        for key, digest, rows in zip(arrays["unit_keys"].tolist(), arrays["digests"].tolist(), arrays["rows"].tolist()):
            saved[key] = (digest.decode(), whole.rows(start, start + rows))
            start += rows
    return saved


def _scan_job(job):
    return scan_partition(*job)


def remove_records(out_url: str) -> None:
    """Delete the scan records (the dataset is complete), those of earlier plans too."""
    folder = storage.join(out_url, PLAN_DIR)
    urls = [item["url"] for item in storage.iter_files(folder)] if storage.exists(folder) else []
    storage.map_reads(storage.delete, urls, folder)  # on S3 a request each: several in flight
    if not storage.is_s3(folder) and os.path.isdir(folder):
        os.rmdir(folder)
