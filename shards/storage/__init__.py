"""The one object-storage layer: local paths and `s3://bucket/key` URLs behind the same functions.

A URL is resolved in one place (`backend`): a local path (or `file://` path) goes to
`LocalStorage` (storage/local.py), `s3://bucket/key` to `S3Storage` (storage/s3.py); any other
scheme (`gs://`, `http://`) and a malformed S3 URL (`s3:/bucket`, `s3://`) raise a StorageError
before anything is read or written. The module-level functions (`exists`, `read_bytes`,
`write_json`, `upload_file`, ...) are what callers use; each asks `backend(url)` and calls the
same method of it (the interface is `Storage` in storage/base.py, in the style of torchtitan's
`CheckpointStorage`). Staging files (`staged`) live here too.

S3 goes through boto3 with botocore's retry config (transient errors retried with backoff) and
multipart transfers for big files. The endpoint comes from `AWS_ENDPOINT_URL` (boto3 reads it)
or `configure(endpoint_url=...)` called once at an entry point; credentials come from the
standard AWS chain and are never logged. Writes are atomic: a local file appears by rename,
an S3 object appears when its (multipart) upload completes. A local output that cannot be
written (disk full, permission denied, read-only file system) raises a one-line StorageError
naming the path; the temporary file is removed.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
from contextlib import contextmanager
from typing import Iterator

# the errors, the interface and the S3 settings are part of this module's interface (re-exported)
from shards.storage.base import CHUNK, Storage, StorageError, StorageNotFound, _output, output_error
from shards.storage.local import LocalStorage
from shards.storage import s3
from shards.storage.s3 import S3Storage, configure, reset_clients, settings_dict

LOCAL, S3 = LocalStorage(), S3Storage()


# ----------------------------------------------------------------------------- URLs

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


def backend(url: str | os.PathLike) -> tuple["Storage", str]:
    """(the store that serves `url`, the URL as that store takes it: a local path or `s3://...`).

    The one place URLs are parsed. Accepted: a local path (also `file:///path`) and
    `s3://BUCKET[/KEY]`. Refused with a StorageError naming the URL and what to write instead:
    another scheme (`gs://x`, `http://...`) and a malformed S3 URL (`s3:/bucket/x`, `s3://`)."""
    url = url if isinstance(url, str) else os.fspath(url)
    if url.startswith("/"):
        return LOCAL, url
    if url.startswith("s3://"):
        if not url[5:].split("/", 1)[0]:
            raise StorageError(f"{url}: missing bucket name; write s3://BUCKET/PREFIX")
        return S3, url
    if url.startswith("file://"):
        return LOCAL, url[len("file://"):]
    scheme = _SCHEME.match(url)
    if scheme and scheme.group(1).lower() == "s3":
        raise StorageError(f"{url}: malformed S3 URL; write s3://BUCKET/PREFIX (lower-case 's3', two slashes)")
    if scheme and url[scheme.end():].startswith("//"):
        raise StorageError(f"{url}: '{scheme.group(1)}://' URLs are not supported; write a local path or "
                           "s3://BUCKET/PREFIX (another S3-compatible store: set AWS_ENDPOINT_URL)")
    return LOCAL, url


def is_s3(url: str | os.PathLike) -> bool:
    return backend(url)[0] is S3


def normalize(url: str | os.PathLike) -> str:
    """An s3:// URL as it is; a local path made absolute (a `file://` prefix dropped)."""
    store, target = backend(url)
    return target if store is S3 else os.path.abspath(target)


def as_local_path(url: str | os.PathLike) -> str:
    """The path of a local URL (without a `file://` prefix); a StorageError for an s3:// one."""
    store, target = backend(url)
    if store is S3:
        raise StorageError(f"{url}: an s3:// URL where a local path is needed")
    return target


def is_absolute(url: str | os.PathLike) -> bool:
    """An s3:// URL or an absolute local path (not relative to some folder)."""
    store, target = backend(url)
    return store is S3 or os.path.isabs(target)


def resolve(base: str, path: str) -> str:
    """A path as a list or manifest writes it: an s3:// URL or an absolute path as it is, else
    relative to the folder / prefix `base` (with `/` between its parts)."""
    return path if is_absolute(path) else join(base, *path.split("/"))


def split(url: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key)."""
    store, url = backend(url)
    if store is not S3:
        raise StorageError(f"{url}: not an s3:// URL")
    return s3.split(url)


def presigned_url(url: str | os.PathLike, *, expires: int = 3600) -> str:
    """A URL a stock reader opens without this project or credentials: a local path as it is, an
    ``s3://`` object as a presigned ``https://`` GET valid ``expires`` seconds."""
    store, url = backend(url)
    if store is LOCAL:
        return url
    bucket, key = split(url)
    return s3._client().generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                               ExpiresIn=int(expires))


def join(url: str | os.PathLike, *parts: str) -> str:
    store, target = backend(url)
    if store is S3:
        out = target.rstrip("/")
        for part in parts:
            out = f"{out}/{str(part).strip('/')}"
        return out
    return os.path.join(target, *parts)


def basename(url: str) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[-1]


def parent(url: str) -> str:
    store, target = backend(str(url).rstrip("/"))
    return target.rsplit("/", 1)[0] if store is S3 else os.path.dirname(target)


# ----------------------------------------------------------------------------- staging

_HOST = re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname())
_STAGING_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9_-]*)\.[^.]+\.partial")


class Staged:
    """A staging file: `fd` and `path` of an empty file to write; `publish()` puts it at the URL whole."""

    def __init__(self, fd: int, path: str, publish):
        self.fd, self.path, self._publish = fd, path, publish

    def publish(self) -> None:
        self._publish()


@contextmanager
def staged(url: str | os.PathLike) -> Iterator[Staged]:
    """A staging file for publishing `url` whole: next to a local destination (published by rename),
    in the temp folder for an s3:// one (uploaded; see `staging_folder`). It is removed on the way
    out whatever happened, so a failure leaves nothing half-written; an output the user has to fix
    (disk full, permission denied, read-only) raises a one-line StorageError naming the path."""
    store, target = backend(url)
    folder = store.staging_folder(parent(target))
    name = f".{basename(target)}.{os.getpid()}@{_HOST}."
    with _output(target if store is LOCAL else folder):
        os.makedirs(folder, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=name, suffix=".partial", dir=folder)
    try:
        with _output(target if store is LOCAL else path):
            yield Staged(fd, path, lambda: store.publish(path, target))
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:  # published by rename
            pass


def remove_stale_staging(folder_url: str | os.PathLike, name: str = "") -> list[str]:
    """Remove the staging files for `folder_url` (those of file `name` only, if given) that a writer
    left when it died (killed, power loss): written by a process of this host that no longer runs,
    or named as older versions named them (no owner). Returns their paths."""
    store, target = backend(folder_url)
    folder = store.staging_folder(target)
    try:
        entries = [e.name for e in os.scandir(folder) if e.name.startswith(f".{name}") and e.name.endswith(".partial")]
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for entry in entries:
        owner = _STAGING_NAME.fullmatch(entry)
        if owner is not None and (owner["host"] != _HOST or _alive(int(owner["pid"]))):
            continue
        if name and (owner is None or owner["name"] != name):
            continue
        try:
            os.unlink(os.path.join(folder, entry))
            removed.append(os.path.join(folder, entry))
        except FileNotFoundError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


# ----------------------------------------------------------------------------- what callers use

def _forward(name: str):
    """The module-level function `name`: resolve the URL (`backend`), call that store's method `name`."""
    def call(url: str | os.PathLike, *args, **kwargs):
        store, target = backend(url)
        return getattr(store, name)(target, *args, **kwargs)
    call.__name__ = call.__qualname__ = name
    call.__doc__ = getattr(Storage, name).__doc__
    return call


exists, size, stat, isdir, listdir, list_recursive, iter_files, open_read, read_ends, delete, makedirs, \
    check_writable = map(_forward, ["exists", "size", "stat", "isdir", "listdir", "list_recursive", "iter_files",
                                    "open_read", "read_ends", "delete", "makedirs", "check_writable"])


def walk(url: str | os.PathLike) -> list[dict]:
    """Like iter_files(), as a list sorted by url."""
    return sorted(iter_files(url), key=lambda item: item["url"])


def read_bytes(url: str | os.PathLike, *, size: int | None = None) -> bytes:
    """A whole file. `size`: what it is expected to hold, when known (saves a stat locally; a file
    of another size is still read whole, for the caller to notice)."""
    store, url = backend(url)
    return store.read_bytes(url, size)


def read_range(url: str | os.PathLike, offset: int, length: int) -> bytes:
    """`length` bytes of a file from `offset` (an S3 ranged GET; a seek locally)."""
    store, url = backend(url)
    return store.read_range(url, offset, length) if length > 0 else b""


def read_record(url: str, offset: int = -1, length: int = -1, *, size: int | None = None) -> bytes:
    """One record's bytes: the whole file at `url` (offset < 0; `size` as in read_bytes), or the
    `length` bytes at `offset` in it (a tar member)."""
    return read_bytes(url, size=size) if offset < 0 else read_range(url, offset, length)


def read_record_into(url: str, offset: int, length: int, out) -> int:
    """Read a record (as read_record) into `out`, a writable buffer of the size it is expected to
    have; returns the record's size. A size other than len(out) means the record changed: then
    `out` holds a part of it, or the whole of it at its start."""
    store, url = backend(url)
    return store.read_into(url, offset, length, out)


_READ_THREADS = 8  # object-store requests in flight per process in map_reads
_read_pools: dict = {}  # pid -> executor (a forked child makes its own)


def map_reads(fn, items: list, url: str) -> list:
    """[fn(item) for item in items], in order; when `url` is on S3, with up to _READ_THREADS at a
    time in threads: each item is a request (a GET of an image) whose round trip would otherwise
    add up one after the other. The first exception raised by fn is raised here."""
    if len(items) < 2 or not url.startswith("s3://"):
        return [fn(item) for item in items]
    pool = _read_pools.get(os.getpid())
    if pool is None:
        from concurrent.futures import ThreadPoolExecutor

        pool = _read_pools[os.getpid()] = ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="vitpipe-read")
    return list(pool.map(fn, items))


def read_json(url: str | os.PathLike):
    data = read_bytes(url)
    try:
        return json.loads(data)
    except json.JSONDecodeError as err:
        raise StorageError(f"{url}: not valid JSON ({err.msg} at line {err.lineno})") from None


def sha256_url(url: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open_read(url) as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_bytes(url: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    """Publish `data` at `url` whole (atomic rename locally). `durable=False` skips the local fsync:
    for records that are checked when read back, where a lost one only means redoing work (an
    fsync can wait a long time behind other writes: the whole journal is committed)."""
    store, url = backend(url)
    store.write_bytes(url, data, durable)


def write_with(url: str | os.PathLike, write, *, durable: bool = True) -> None:
    """Publish at `url` whole what write(file) writes to a binary file (readable too), as write_bytes
    would publish its bytes (the same requests on S3), without holding them in memory: streamed to
    the local staging file, or for s3:// to an anonymous temp file, then uploaded."""
    store, url = backend(url)
    store.write_with(url, write, durable)


def write_json(url: str | os.PathLike, obj, *, durable: bool = True) -> None:
    write_bytes(url, (json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n").encode("utf-8"),
                durable=durable)


def upload_file(local_path: str | os.PathLike, url: str | os.PathLike) -> None:
    """Publish a local file at `url` (multipart above the threshold; atomic either way)."""
    store, url = backend(url)
    store.upload_file(as_local_path(local_path), url)


def download_file(url: str | os.PathLike, local_path: str | os.PathLike) -> None:
    store, url = backend(url)
    store.download_file(url, as_local_path(local_path))


def copy(src_url: str | os.PathLike, dst_url: str | os.PathLike) -> None:
    """Copy one file between any two URLs."""
    (src, src_url), (dst, dst_url) = backend(src_url), backend(dst_url)
    if src is S3 and dst is S3:
        S3.copy_object(src_url, dst_url)
    elif src is S3:
        src.download_file(src_url, dst_url)
    else:
        dst.upload_file(src_url, dst_url)


def copy_tree(src_url: str | os.PathLike, dst_url: str | os.PathLike) -> list[str]:
    """Copy every file under a folder / prefix to another (either direction); returns the new URLs."""
    (src, src_url), (_, dst_url) = backend(str(src_url).rstrip("/")), backend(str(dst_url).rstrip("/"))
    out = []
    for url in src.list_recursive(src_url):
        rel = url[len(src_url):].lstrip("/") if src is S3 else os.path.relpath(url, src_url).replace(os.sep, "/")
        target = join(dst_url, *rel.split("/"))
        copy(url, target)
        out.append(target)
    return out
