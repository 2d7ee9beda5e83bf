"""Sources: list the records of an image corpus (key, where the bytes are, labels) and read them.

Formats (local or under s3://):
- `imagefolder`: ROOT/<class>/<image> (ImageNet-21k winter21, ImageNet-1k train/val);
- `i21k-tars`: a folder of per-synset tars (n01440764.tar holds that class's images) or one
  tar of such tars (the ImageNet-21k release). Tars are read as streams and indexed by member
  offset; nothing is extracted to disk. Unsafe members (absolute, `..`, links, devices) are refused;
- `jsonl`: one JSON object per line {"path": ..., "labels": [...]} (JFT style, multi-label); the
  path is relative to the manifest or an s3:// URL;
- `csv`: the same columns (`path`, `labels` separated by `;` or a JSON list).
Listing is cheap (no image is read) and sorted, so everything built on it is deterministic.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from operator import attrgetter
from typing import NamedTuple

from shards import storage
from shards.errors import VitpipeError
from shards.table import RecordTable, make_key

FORMATS = ("imagefolder", "i21k-tars", "jsonl", "csv")


class SourceError(VitpipeError, ValueError):
    """The source cannot be read as asked; the one-line message says what to fix."""


@dataclass(frozen=True, slots=True)
class RecordRef:
    """Where one record's bytes are: a whole file (`offset` None) or `length` bytes at `offset` of a tar."""

    key: str
    url: str
    labels: tuple[str, ...]
    path: str  # the original path, relative to the source root (for the sample's json)
    offset: int | None = None
    length: int | None = None

    def read(self) -> bytes:
        if self.offset is None:
            return storage.read_bytes(self.url)
        return storage.read_range(self.url, self.offset, self.length or 0)


@dataclass
class Listing:
    kind: str
    url: str
    records: RecordTable
    skipped: list[dict] = field(default_factory=list)  # refused at listing time: {"path", "reason"}
    fingerprint: str = ""
    class_names: list[str] = field(default_factory=list)  # every class the source declares (folders, synsets)


_JSON_ESCAPED = re.compile(r'["\\\x00-\x1f]')  # what json.dumps(ensure_ascii=False) escapes in a string


class _Fingerprint:
    """Incremental hash of listing entries (nothing kept in memory)."""

    def __init__(self, kind: str | None):
        # kind None: keep the bytes instead (a partition's share, hashed in order by the coordinator)
        self._digest = None if kind is None else hashlib.sha256(kind.encode())
        self.data = bytearray() if kind is None else None

    def update(self, data: bytes) -> None:
        if self._digest is None:
            self.data += data
        else:
            self._digest.update(data)

    def append(self, entry) -> None:
        self.update(json.dumps(entry, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n")

    def extend_files(self, folder: str, names: list[str], sizes: list[int], mtimes: list[float]) -> None:
        """append([folder + name, size, mtime]) for each file (int sizes, float mtimes), hashing the same bytes
        without a json.dumps per file: json writes an int or a float as its repr, and a string as is in quotes
        unless it holds a character it escapes."""
        times = set(mtimes)
        if len(times) < len(mtimes) and 0.0 not in times:  # shared mtimes (copied, untarred files): one repr each
            stamps = map({m: repr(m) for m in times}.__getitem__, mtimes)  # (0.0 == -0.0, their reprs differ)
        else:
            stamps = map(repr, mtimes)
        if _JSON_ESCAPED.search(folder) or _JSON_ESCAPED.search("".join(names)):
            quote = json.encoder.encode_basestring
            lines = [f"[{quote(folder + n)}, {s!r}, {m}]\n" for n, s, m in zip(names, sizes, stamps)]
        else:
            lines = [f'["{folder}{n}", {s!r}, {m}]\n' for n, s, m in zip(names, sizes, stamps)]
        try:
            data = "".join(lines).encode("utf-8")
        except UnicodeEncodeError:  # a name that is not UTF-8: fail exactly as append() does
            for n, s, m in zip(names, sizes, mtimes):
                self.append([folder + n, s, m])
            raise
        self.update(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def deferred_entries(records: RecordTable, runs: list, sizes, mtimes, entries: _Fingerprint) -> None:
    """Add the fingerprint entries of a listing made without a stat per file (`runs` from
    _add_folder_runs: (folder, lo, hi) for record rows lo..hi-1, (folder, names, sizes, mtimes) for
    files that are not records), from each record row's size and mtime as the scan found them
    (arrays by row; size -1 where the scan could not open the file: then it is stated here)."""
    for run in runs:
        if len(run) == 4:
            entries.extend_files(*run)
            continue
        folder, lo, hi = run
        names = records._names(lo, hi, folder) if hi > lo else []
        run_sizes, run_mtimes = sizes[lo:hi].tolist(), mtimes[lo:hi].tolist()
        for i in (i for i, size in enumerate(run_sizes) if size < 0):
            run_sizes[i], run_mtimes[i] = _stat_or_missing(records.url(lo + i))
        entries.extend_files(folder, names, run_sizes, run_mtimes)


def _stat_or_missing(path: str) -> tuple[int, float]:
    """(size, mtime) of a local file as the fingerprint lists it; (-1, -1.0) for one that cannot be
    stated (a broken link): it is listed, and skipped as unreadable when scanned."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1.0
    return st.st_size, st.st_mtime


def _check_utf8(folder: str, names: list[str]) -> None:
    """Raise the UnicodeEncodeError the fingerprint raises on a name that is not UTF-8 (list_source
    turns it into a SourceError naming the file)."""
    try:
        (folder + "".join(names)).encode("utf-8")
    except UnicodeEncodeError:
        for name in names:
            f'"{folder}{name}"'.encode("utf-8")


def detect_format(url: str) -> str:
    url = str(url)
    lower = url.lower().rstrip("/")
    if lower.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if lower.endswith(".csv"):
        return "csv"
    if lower.endswith(".tar"):
        return "i21k-tars"
    names = storage.listdir(url)
    if not names:
        raise SourceError(f"{url}: empty source (no files); point at a class-folder tree, a folder of tars or a manifest")
    tars = [n for n in names if n.lower().endswith(".tar")]
    if tars and len(tars) == len([n for n in names if not n.startswith(".")]):
        return "i21k-tars"
    visible = [n for n in names if not n.startswith(".")]
    if any(storage.isdir(storage.join(url, n)) for n in visible[:20]):  # a sample: 21k classes on S3 = 21k LISTs
        return "imagefolder"
    raise SourceError(f"{url}: unknown source format (no class folders, tars or .jsonl/.csv manifest); "
                      "pass --format imagefolder|i21k-tars|jsonl|csv")


def source_kind(url: str, format: str | None = None) -> tuple[str, str]:
    """(normalized url, format) of an existing source; raises SourceError (missing, unknown format)."""
    try:
        url = storage.normalize(url)
        present = storage.exists(url)
    except storage.StorageError as err:
        raise SourceError(str(err)) from None
    if not present:
        raise SourceError(f"{url}: source not found; check the path or URL")
    kind = format or detect_format(url)
    if kind not in FORMATS:
        raise SourceError(f"--format {kind}: unknown; use one of {', '.join(FORMATS)}")
    return url, kind


def list_source(url: str, *, format: str | None = None, pool=None) -> Listing:
    """List a source; raises SourceError (missing, empty, unknown format, empty class folder...).
    `pool`: an executor whose processes index the tars of an i21k-tars folder (one tar each at a
    time). (Planning lists through shards.partitions, by names alone where it can.)"""
    url, kind = source_kind(url, format)
    try:
        if kind == "imagefolder":
            listing = _list_imagefolder(url, kind)
        elif kind == "i21k-tars":
            listing = _list_tars(url, kind, pool=pool)
        else:
            listing = _list_manifest(url, kind)
    except UnicodeEncodeError as err:  # a name the OS gave as undecodable bytes (surrogate escapes)
        text = err.object if isinstance(err.object, str) else ""
        left, right = text.rfind('"', 0, err.start) + 1, text.find('"', err.end)
        name = text[left:right] if right > 0 else text[max(0, err.start - 60):err.end + 20]  # the quoted path, if any
        raise SourceError(f"{url}: a file or folder name is not valid UTF-8 ({os.fsencode(name)!r}); "
                          "rename it to UTF-8 (e.g. with convmv) and re-run") from None
    if not len(listing.records) and not listing.skipped:
        raise SourceError(f"{url}: empty source (no images found as {kind})")
    listing.records.make_keys_unique()
    return listing


# ----------------------------------------------------------------------------- imagefolder

_FOLDER_CHUNK = 8192  # files of one folder handled at a time (bounds memory in a huge flat folder)


def _s3_folders(url: str, root: str):
    """storage.iter_files(url) as runs (folder, names, sizes, mtimes): rel path = folder + name, folder "" or "a/b/"."""
    run = None
    for item in storage.iter_files(url):
        rel = item["url"][len(root):].lstrip("/").replace(os.sep, "/")
        cut = rel.rfind("/") + 1
        if run is None or run[0] != rel[:cut] or len(run[1]) >= _FOLDER_CHUNK:
            if run is not None:
                yield run
            run = (rel[:cut], [], [], [])
        run[1].append(rel[cut:])
        run[2].append(item["size"])
        run[3].append(item["mtime"])
    if run is not None:
        yield run


def _local_folders(url: str, root: str, *, stat: bool = True):
    """The same runs as _s3_folders gives for storage.iter_files(url) on a local tree (its os.walk order: folders
    top-down, subfolders and files sorted; unreadable folders and links to folders left out), from os.scandir
    with one stat per file (relative to the open folder) and no per-file dict or path join."""
    top = storage.as_local_path(url)
    if not os.path.isdir(top):
        raise storage.StorageNotFound(f"{url}: not found or not a folder")
    stack = [top]
    while stack:
        path = stack.pop()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:  # as os.walk: a folder that cannot be read is left out
            continue
        try:
            subfolders = yield from _local_folder(path, fd, root, stat)
        finally:
            os.close(fd)
        stack.extend(reversed(subfolders))


def _local_folder(path: str, fd: int, root: str, stat: bool = True):
    """The runs of one folder (`fd` open on it); returns its subfolders to walk, sorted. `stat`
    False: the runs' sizes and mtimes are None."""
    try:
        with os.scandir(fd) as it:
            entries = list(it)
    except OSError:
        return []
    dirs, files = [], []
    for entry in entries:
        try:
            is_dir = entry.is_dir()
        except OSError:
            is_dir = False
        (dirs if is_dir else files).append(entry)
    files.sort(key=attrgetter("name"))
    folder = os.path.join(path, "")[len(root):].lstrip("/").replace(os.sep, "/")
    for lo in range(0, len(files), _FOLDER_CHUNK):
        chunk = files[lo:lo + _FOLDER_CHUNK]
        names = [entry.name for entry in chunk]
        if not stat:
            yield folder, names, None, None
            continue
        try:
            stats = [(st.st_size, st.st_mtime) for st in (entry.stat() for entry in chunk)]
        except OSError:  # e.g. a broken link: listed as (-1, -1.0), skipped as unreadable by the scan
            stats = [_stat_or_missing(os.path.join(path, name)) for name in names]
        yield folder, names, [size for size, _ in stats], [mtime for _, mtime in stats]
    subfolders = (os.path.join(path, name) for name in sorted(entry.name for entry in dirs))
    return [sub for sub in subfolders if not os.path.islink(sub)]


def _list_imagefolder(url: str, kind: str) -> Listing:
    s3 = storage.is_s3(url)
    root = url.rstrip("/") if s3 else url.rstrip(os.sep)
    folders = _s3_folders(url, root) if s3 else _local_folders(url, root)
    records, skipped, entries = RecordTable(), [], _Fingerprint(kind)
    class_files: dict[str, int] = {}
    if not s3:  # empty class folders exist only locally (S3 has no empty prefixes)
        for name in storage.listdir(url):
            if not name.startswith(".") and os.path.isdir(os.path.join(url, name)):
                class_files.setdefault(name, 0)
    _add_folder_runs(folders, root, records, skipped, entries, class_files)
    empty = sorted(c for c, n in class_files.items() if n == 0)
    if empty:
        raise SourceError(f"{storage.join(url, empty[0])}: class folder has no images; add images or remove the folder"
                          + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""))
    if not class_files:
        raise SourceError(f"{url}: no class folders; an imagefolder source is ROOT/<class>/<image>")
    return Listing(kind, url, records, skipped, entries.hexdigest(), sorted(class_files))


def _add_folder_runs(folders, root: str, records: RecordTable, skipped: list, entries: _Fingerprint,
                     class_files: dict, runs: list | None = None) -> None:
    """Add the runs (folder, names, sizes, mtimes) of an imagefolder walk: records, skips, the fingerprint's
    entries (or, `runs` given, the deferred runs) and each class folder's file count."""
    for folder, names, sizes, mtimes in folders:
        cls = folder.split("/", 1)[0]
        record = bool(folder) and not cls.startswith(".")
        if runs is None:
            entries.extend_files(folder, names, sizes, mtimes)
        elif record:
            _check_utf8(folder, names)
            runs.append((folder, len(records), len(records) + len(names)))
        else:  # not records: stated now, as the scan will not open them
            stats = [_stat_or_missing(os.path.join(root, *folder.split("/"), name)) for name in names]
            runs.append((folder, names, [size for size, _ in stats], [mtime for _, mtime in stats]))
        if not folder:
            skipped.extend({"path": name, "reason": "not inside a class folder"} for name in names)
        if not record:
            continue
        class_files[cls] = class_files.get(cls, 0) + len(names)
        records.extend_files(root=root, folder=folder, names=names, label=cls)  # keys derived from the paths


# ----------------------------------------------------------------------------- i21k tars

def unsafe_member_reason(member: tarfile.TarInfo) -> str | None:
    name = member.name
    if member.issym() or member.islnk():
        return "unsafe tar member (link)"
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        return "unsafe tar member (device or fifo)"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "unsafe tar member (absolute path)"
    if ".." in re.split(r"[/\\]", name):
        return "unsafe tar member (.. in path)"
    if not member.isfile() and not member.isdir():
        return "unsafe tar member (not a regular file)"
    return None


def _index_tar(fileobj, *, tar_url: str, synset: str, base_offset: int, label_path: str,
               records: list, skipped: list) -> int:
    """Index one per-synset tar read from `fileobj` (a stream); returns how many images it held."""
    count = 0
    try:
        try:
            seekable = bool(fileobj.seekable())
        except (AttributeError, OSError):
            seekable = False
        with tarfile.open(fileobj=fileobj, mode="r:" if seekable else "r|") as tar:
            for member in tar:
                rel = f"{label_path}/{member.name}"
                reason = unsafe_member_reason(member)
                if reason:
                    skipped.append({"path": rel, "reason": reason})
                    continue
                if member.isdir():
                    continue
                stem = member.name.replace("\\", "/").rsplit("/", 1)[-1]
                records.append(key=make_key(f"{synset}/{stem}"), root=tar_url, path=rel, labels=(synset,),
                               offset=base_offset + member.offset_data, length=member.size)
                count += 1
    except tarfile.TarError as err:
        skipped.append({"path": label_path, "reason": f"unreadable tar ({err})"})
    return count


class _TarJob(NamedTuple):
    """One per-synset tar to index: a file (offset None) or `size` bytes at `offset` of a tar of tars."""
    url: str
    synset: str
    label_path: str
    offset: int | None = None
    size: int | None = None


def _index_tar_job(job: _TarJob) -> tuple[RecordTable, list[dict]]:
    """The records and skips of one per-synset tar (run in a worker process when there is a pool)."""
    records, skipped = RecordTable(), []
    with storage.open_read(job.url) as f:
        stream = f
        if job.offset is not None:  # a member of a local tar of tars, read where it lies
            inner = tarfile.TarInfo(job.label_path + ".tar")
            inner.offset_data, inner.size = job.offset, job.size
            stream = tarfile.open(fileobj=f, mode="r:").extractfile(inner)
        _index_tar(stream, tar_url=job.url, synset=job.synset, base_offset=job.offset or 0,
                   label_path=job.label_path, records=records, skipped=skipped)
    return records, skipped


def _index_tars(walk: list, pool, records: RecordTable, skipped: list, *, empty_is_error: bool) -> None:
    """Index the _TarJobs of `walk` (in the worker processes when there is a pool: parsing member
    headers is most of a listing's cost) and merge them, and its skips (dicts), in walk order."""
    jobs = [step for step in walk if isinstance(step, _TarJob)]
    parts = iter(pool.map(_index_tar_job, jobs, chunksize=max(1, min(16, len(jobs) // 64))) if pool is not None
                 else map(_index_tar_job, jobs))
    for step in walk:
        if isinstance(step, dict):
            skipped.append(step)
            continue
        part, part_skipped = next(parts)
        if empty_is_error and not len(part):
            raise SourceError(f"{step.url}: class tar has no images; remove it or fix the tar")
        records.extend(part)
        skipped.extend(part_skipped)


def _list_tars(url: str, kind: str, *, pool=None) -> Listing:
    records, skipped, entries = RecordTable(), [], _Fingerprint(kind)
    walk = []  # in listing order: skips (dicts) and tars to index (_TarJob)
    if url.lower().endswith(".tar") and not storage.isdir(url):
        # one tar of per-synset tars: inner tars are indexed where they lie in it (by workers, when a
        # pool is given and the file is local), or streamed (S3); members get absolute offsets
        st = storage.stat(url)
        entries.append([storage.basename(url), st["size"], st["mtime"]])
        stream_now, synsets = pool is None or storage.is_s3(url), set()
        with storage.open_read(url) as f, tarfile.open(fileobj=f, mode="r|" if storage.is_s3(url) else "r:") as outer:
            for inner in outer:
                reason = unsafe_member_reason(inner)
                if reason:
                    step = {"path": inner.name, "reason": reason}
                elif not inner.isfile():
                    continue
                elif not inner.name.lower().endswith(".tar"):
                    step = {"path": inner.name, "reason": "not a per-synset tar"}
                else:
                    step = _TarJob(url, inner.name.rsplit("/", 1)[-1][:-4], inner.name[:-4], inner.offset_data, inner.size)
                    synsets.add(step.synset)
                if not stream_now:
                    walk.append(step)
                elif isinstance(step, dict):
                    skipped.append(step)
                else:
                    _index_tar(outer.extractfile(inner), tar_url=url, synset=step.synset, base_offset=step.offset,
                               label_path=step.label_path, records=records, skipped=skipped)
        _index_tars(walk, pool, records, skipped, empty_is_error=False)
        return Listing(kind, url, records, skipped, entries.hexdigest(), sorted(synsets))
    walk = tar_steps(url, entries)
    _index_tars(walk, pool, records, skipped, empty_is_error=True)
    return Listing(kind, url, records, skipped, entries.hexdigest(),
                   sorted({step.synset for step in walk if isinstance(step, _TarJob)}))


def tar_steps(url: str, entries: _Fingerprint) -> list:
    """The steps of a folder of tars in listing order: a _TarJob per tar, a skip (dict) per other
    file; each file's entry added to the fingerprint."""
    steps = []
    for item in storage.iter_files(url):
        name = item["url"].rstrip("/").rsplit("/", 1)[-1]
        entries.append([name, item["size"], item["mtime"]])
        if name.lower().endswith(".tar"):
            steps.append(_TarJob(item["url"], name[:-4], name[:-4]))
        elif not name.startswith("."):
            steps.append({"path": name, "reason": "not a per-synset tar"})
    if not any(isinstance(step, _TarJob) for step in steps):
        raise SourceError(f"{url}: no .tar files; an i21k-tars source is a folder of <synset>.tar")
    return steps


# ----------------------------------------------------------------------------- jsonl / csv manifests

def _parse_labels(value, *, where: str) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        labels = value
    elif isinstance(value, (int, str)):
        text = str(value).strip()
        if text.startswith("["):
            try:
                labels = json.loads(text)
            except json.JSONDecodeError:
                raise SourceError(f"{where}: labels {text!r} is not a JSON list") from None
        else:
            labels = [part for part in re.split(r"[;|]", text) if part.strip()]
    else:
        raise SourceError(f"{where}: 'labels' must be a list of class names")
    out = tuple(str(label).strip() for label in labels)
    if not out or any(not label for label in out):
        raise SourceError(f"{where}: empty label; every record needs at least one class name")
    return out


def _list_manifest(url: str, kind: str) -> Listing:
    raw = storage.read_bytes(url)
    records, entries = RecordTable(), _Fingerprint(kind)
    entries.append([storage.basename(url), hashlib.sha256(raw).hexdigest()])
    add_manifest_rows(url, kind, raw.decode("utf-8-sig"), records, entries)
    if not len(records):
        raise SourceError(f"{url}: empty manifest (no records)")
    return Listing(kind, url, records, [], entries.hexdigest(), sorted(records.label_names))


def add_manifest_rows(url: str, kind: str, text: str, records: RecordTable, entries: _Fingerprint,
                      first_line: int = 1) -> None:
    """Add the rows of manifest text (all of a csv; whole lines of a jsonl, the first of them line
    `first_line` of the file) to `records`, and their entries to the fingerprint."""
    base = storage.parent(url)
    rows: list[tuple[int, dict]] = []
    if kind == "csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "path" not in reader.fieldnames or not ({"labels", "label"} & set(reader.fieldnames)):
            raise SourceError(f"{url}: CSV needs columns 'path' and 'labels'; found {reader.fieldnames}")
        rows = [(i + 2, row) for i, row in enumerate(reader)]
    else:
        for lineno, line in enumerate(text.splitlines(), first_line):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise SourceError(f"{url}:{lineno}: not valid JSON ({err.msg}); one JSON object per line") from None
            if not isinstance(obj, dict):
                raise SourceError(f"{url}:{lineno}: expected a JSON object with 'path' and 'labels'")
            rows.append((lineno, obj))
    for lineno, row in rows:
        where = f"{url}:{lineno}"
        path = row.get("path") or row.get("image")
        if not path:
            raise SourceError(f"{where}: missing 'path' (the image path, relative to the manifest, or an s3:// URL)")
        labels = _parse_labels(row.get("labels", row.get("label")), where=where)
        path = str(path)
        try:
            absolute = storage.is_absolute(path)
        except storage.StorageError as err:
            raise SourceError(f"{where}: {err}") from None
        target = path if absolute else storage.join(base, *path.split("/"))
        if not storage.is_s3(target):
            try:
                st = os.stat(target)
                entries.append([path, st.st_size, st.st_mtime])
            except OSError:
                entries.append([path, None, None])
        key = make_key(str(row["key"])) if row.get("key") else make_key(path.split("://", 1)[-1])
        records.append(key=key, root="" if absolute else base, path=path, labels=labels)


def source_fingerprint(source: str, *, format: str | None = None) -> str:
    """Stable hash of the source listing (paths, sizes, mtimes; a manifest's contents): unchanged input, same hash."""
    from shards.partitions import source_listing

    return source_listing(source, format=format).fingerprint
