"""The one object-storage layer: local paths and `s3://bucket/key` URLs behind the same functions.

A URL is resolved in one place (`backend`): a local path (or `file://` path) goes to `LocalStorage`,
`s3://bucket/key` to `S3Storage`; any other scheme (`gs://`, `http://`) and a malformed S3 URL
(`s3:/bucket`, `s3://`) raise a StorageError before anything is read or written. The module-level
functions (`exists`, `read_bytes`, `write_json`, `upload_file`, ...) are what callers use; each
asks `backend(url)` and calls the same method of it (the interface is `Storage`, in the style of
torchtitan's `CheckpointStorage`).

S3 goes through boto3 with botocore's retry config (transient errors retried with backoff) and
multipart transfers for big files. The endpoint comes from `AWS_ENDPOINT_URL` (boto3 reads it)
or `configure(endpoint_url=...)` called once at an entry point; credentials come from the
standard AWS chain and are never logged. Writes are atomic: a local file appears by rename,
an S3 object appears when its (multipart) upload completes. A local output that cannot be
written (disk full, permission denied, read-only file system) raises a one-line StorageError
naming the path; the temporary file is removed.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import socket
import tempfile
import threading
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from shards.errors import VitpipeError

_CHUNK = 8 * 1024 * 1024


class StorageError(VitpipeError, RuntimeError):
    """Object storage failed; the message names the URL and what to do."""


class StorageUnavailable(StorageError):
    """The store could not be reached or answered with a server error: a retry may succeed."""

    transient = True


class StorageNotFound(StorageError, FileNotFoundError):
    """The URL does not exist."""


@dataclass
class _Settings:
    endpoint_url: str | None = None
    max_attempts: int = 5
    multipart_threshold: int = 64 * 1024 * 1024
    multipart_chunksize: int = 16 * 1024 * 1024


# Process-wide settings set once by an entry point (the CLI's --s3-endpoint); clients are per process.
_settings = _Settings()
_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def configure(*, endpoint_url: str | None = None, max_attempts: int | None = None,
              multipart_threshold: int | None = None, multipart_chunksize: int | None = None) -> None:
    """Set the S3 endpoint (else AWS_ENDPOINT_URL / AWS) and transfer knobs for this process."""
    if endpoint_url is not None:
        _settings.endpoint_url = endpoint_url or None
    if max_attempts is not None:
        _settings.max_attempts = max_attempts
    if multipart_threshold is not None:
        _settings.multipart_threshold = multipart_threshold
    if multipart_chunksize is not None:
        _settings.multipart_chunksize = multipart_chunksize
    with _clients_lock:
        _clients.clear()


def reset_clients() -> None:
    """Forget cached S3 clients (after the endpoint or credentials in the environment changed)."""
    with _clients_lock:
        _clients.clear()


def settings_dict() -> dict:
    """The settings a worker process needs to talk to the same store (no secrets)."""
    return {"endpoint_url": _settings.endpoint_url, "max_attempts": _settings.max_attempts,
            "multipart_threshold": _settings.multipart_threshold,
            "multipart_chunksize": _settings.multipart_chunksize}


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
    bucket, _, key = url[len("s3://"):].partition("/")
    return bucket, key


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


_OUTPUT_ERRORS = {errno.ENOSPC: "no space left on the device; free space or write elsewhere",
                  errno.EDQUOT: "disk quota exceeded; free space or write elsewhere",
                  errno.EFBIG: "file too large for this file system or the process's size limit; write elsewhere",
                  errno.EACCES: "permission denied; fix the permissions or write elsewhere",
                  errno.EPERM: "operation not permitted; fix the permissions or write elsewhere",
                  errno.EROFS: "read-only file system; write elsewhere"}


def output_error(err: OSError, path: str) -> StorageError | None:
    """A one-line StorageError for an OSError writing `path` that the user has to fix (disk full,
    quota, file too large, permission denied, read-only file system), else None."""
    what = _OUTPUT_ERRORS.get(err.errno)
    return None if what is None else StorageError(f"{path}: cannot write: {what}")


@contextmanager
def _output(path: str):
    """Turn an output OSError the user has to fix into a one-line StorageError naming `path`."""
    try:
        yield
    except OSError as err:
        if isinstance(err, StorageError):
            raise
        mapped = output_error(err, path)
        if mapped is None:
            raise
        raise mapped from None


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


# ----------------------------------------------------------------------------- the interface

class Storage(ABC):
    """What a store does; `LocalStorage` and `S3Storage` implement it. Methods take the URL as
    `backend` resolved it (a local path, or an `s3://` URL); the module-level functions of the
    same names are what callers use."""

    @abstractmethod
    def exists(self, url: str) -> bool:
        """Whether a file, or anything under a folder / prefix, is there."""

    @abstractmethod
    def size(self, url: str) -> int:
        """Bytes of one file (StorageNotFound if it is not there)."""

    @abstractmethod
    def stat(self, url: str) -> dict:
        """{'size', 'mtime' (float or None), 'etag' (S3 only)} of one file."""

    @abstractmethod
    def isdir(self, url: str) -> bool:
        """Whether `url` is a folder / a prefix with something under it."""

    @abstractmethod
    def listdir(self, url: str) -> list[str]:
        """Names directly under a folder / prefix, sorted."""

    @abstractmethod
    def list_recursive(self, url: str) -> list[str]:
        """Full URLs of every file under a folder / prefix, sorted."""

    @abstractmethod
    def iter_files(self, url: str) -> Iterator[dict]:
        """{'url', 'size', 'mtime'} of every file under a folder / prefix, streamed."""

    @abstractmethod
    def open_read(self, url: str) -> BinaryIO:
        """A binary stream of the file; S3 objects are streamed, not downloaded first."""

    @abstractmethod
    def read_bytes(self, url: str, size: int | None = None) -> bytes: ...

    @abstractmethod
    def read_range(self, url: str, offset: int, length: int) -> bytes: ...

    @abstractmethod
    def read_into(self, url: str, offset: int, length: int, out) -> int:
        """Read a record (the whole file, offset < 0; or `length` bytes at `offset`) into `out`; its size."""

    def read_ends(self, url: str, head: int, tail: int, offset: int | None = None, length: int | None = None
                  ) -> tuple[bytes, bytes, int, float | None] | None:
        """(first `head` bytes, last `tail` bytes, size, mtime) of a file, or of the `length` bytes at
        `offset` in it (a tar member; mtime None), without reading the middle; the tail is empty when
        the head holds everything. None where one read of the whole record is the cheaper request (S3)."""
        return None

    @abstractmethod
    def write_bytes(self, url: str, data: bytes, durable: bool = True) -> None: ...

    @abstractmethod
    def upload_file(self, local_path: str, url: str) -> None:
        """Publish a copy of a local file at `url` (atomic)."""

    @abstractmethod
    def download_file(self, url: str, local_path: str) -> None: ...

    @abstractmethod
    def staging_folder(self, folder_url: str) -> str:
        """The local folder where files for `folder_url` are staged before `publish`."""

    @abstractmethod
    def publish(self, staging_path: str, url: str) -> None:
        """Put a staging file (see `staged`) at `url`, whole."""

    @abstractmethod
    def delete(self, url: str) -> None:
        """Delete one file (missing is fine)."""

    def makedirs(self, url: str) -> None:
        """Create a local folder (S3 prefixes need none)."""

    @abstractmethod
    def check_writable(self, url: str) -> None:
        """Fail early with a one-line StorageError if the folder / prefix `url` cannot be written."""


# ----------------------------------------------------------------------------- the S3 client

def _client():
    # the environment is part of the key so a client never outlives the endpoint/keys it was made for
    key = (os.getpid(), _settings.endpoint_url, _settings.max_attempts, os.environ.get("AWS_ENDPOINT_URL"),
           os.environ.get("AWS_ACCESS_KEY_ID"), hash(os.environ.get("AWS_SECRET_ACCESS_KEY")),
           os.environ.get("AWS_PROFILE"))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(retries={"max_attempts": _settings.max_attempts, "mode": "standard"},
                            connect_timeout=10, read_timeout=120, max_pool_connections=16)
            session = boto3.session.Session()
            client = session.client("s3", endpoint_url=_settings.endpoint_url, config=config)
            _clients[key] = client
    return client


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=_settings.multipart_threshold,
                          multipart_chunksize=_settings.multipart_chunksize, use_threads=True, max_concurrency=4)


def _endpoint_name() -> str:
    return _settings.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def _s3_error(err: Exception, url: str) -> StorageError:
    """Turn a botocore/boto3 error into a one-line StorageError that says what to fix."""
    from botocore import exceptions as bx

    if isinstance(err, StorageError):
        return err
    if isinstance(err, bx.NoCredentialsError):
        return StorageError(f"{url}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                            "(or an AWS profile)")
    if isinstance(err, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ConnectionClosedError)):
        return StorageUnavailable(f"{url}: cannot reach S3 endpoint {_endpoint_name()}; start the store "
                                  "(`vitpipe objectstore up`) or fix AWS_ENDPOINT_URL / --s3-endpoint")
    if isinstance(err, bx.ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            bucket = split(url)[0] if is_s3(url) else "?"
            return StorageError(f"{url}: bucket '{bucket}' does not exist at {_endpoint_name()}; create it "
                                "or fix the URL")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return StorageNotFound(f"{url}: not found")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden",
                    "InvalidToken", "ExpiredToken") or status == 403:
            return StorageError(f"{url}: access denied by {_endpoint_name()} ({code}); check AWS_ACCESS_KEY_ID / "
                                "AWS_SECRET_ACCESS_KEY and the bucket's permissions")
        error = StorageUnavailable if isinstance(status, int) and status >= 500 else StorageError
        return error(f"{url}: S3 error {code or status} from {_endpoint_name()}")
    if isinstance(err, bx.BotoCoreError):  # timeouts, connections cut mid-transfer: worth a retry
        return StorageUnavailable(f"{url}: S3 failure talking to {_endpoint_name()}: {type(err).__name__}")
    return StorageError(f"{url}: {type(err).__name__}: {err}")


def _s3_call(url: str, fn, *args, **kwargs):
    from botocore import exceptions as bx

    try:
        return fn(*args, **kwargs)
    except (bx.BotoCoreError, bx.ClientError) as err:
        raise _s3_error(err, url) from None


def _head(url: str) -> dict | None:
    from botocore import exceptions as bx

    bucket, key = split(url)
    try:
        return _client().head_object(Bucket=bucket, Key=key)
    except bx.ClientError as err:
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 404 and key:
            _check_bucket(url)  # head_object gives a bare 404 for a missing bucket too
            return None
        if status == 404:
            _check_bucket(url)
        raise _s3_error(err, url) from None
    except bx.BotoCoreError as err:
        raise _s3_error(err, url) from None


def _check_bucket(url: str) -> None:
    from botocore import exceptions as bx

    bucket, _ = split(url)
    try:
        _client().head_bucket(Bucket=bucket)
    except bx.ClientError as err:
        if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            raise StorageError(f"{url}: bucket '{bucket}' does not exist at {_endpoint_name()}; create it "
                               "or fix the URL") from None
        raise _s3_error(err, url) from None
    except bx.BotoCoreError as err:
        raise _s3_error(err, url) from None


def _iter_objects(url: str, *, delimiter: str | None = None) -> Iterator[dict]:
    bucket, key = split(url)
    prefix = key.rstrip("/") + "/" if key else ""
    kwargs = {"Bucket": bucket, "Prefix": prefix}
    if delimiter:
        kwargs["Delimiter"] = delimiter
    paginator = _client().get_paginator("list_objects_v2")
    from botocore import exceptions as bx

    try:
        for page in paginator.paginate(**kwargs):
            for item in page.get("CommonPrefixes", []) or []:
                yield {"Prefix": item["Prefix"]}
            for item in page.get("Contents", []) or []:
                yield item
    except (bx.BotoCoreError, bx.ClientError) as err:
        raise _s3_error(err, url) from None


# ----------------------------------------------------------------------------- local files

def _atomic_local_write(path: str, write, durable: bool = True) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    with _output(path):
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; published files are readable like the shards
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def _read_local(path: str, size: int | None = None) -> bytes:
    """A whole local file with plain os calls (no buffered-file object: about half the per-file
    cost, which is what matters when reading millions of small images). One read when the size
    is right: a regular file reads short only at its end."""
    fd = os.open(path, os.O_RDONLY)
    try:
        expected = os.fstat(fd).st_size if size is None else size
        parts = [os.read(fd, expected + 1)]
        if len(parts[0]) == expected:
            return parts[0]
        while parts[-1]:  # the file grew, shrank or read short: go on to the end
            parts.append(os.read(fd, 1 << 20))
        return b"".join(parts)
    finally:
        os.close(fd)


_SPARE = bytearray(1)


class LocalStorage(Storage):
    """Files on a local (or mounted) file system."""

    def exists(self, url):
        return os.path.exists(url)

    def size(self, url):
        try:
            return os.path.getsize(url)
        except FileNotFoundError:
            raise StorageNotFound(f"{url}: not found") from None

    def stat(self, url):
        st = os.stat(url)
        return {"size": st.st_size, "mtime": st.st_mtime, "etag": None}

    def isdir(self, url):
        return os.path.isdir(url)

    def listdir(self, url):
        try:
            return sorted(os.listdir(url))
        except FileNotFoundError:
            raise StorageNotFound(f"{url}: not found") from None
        except NotADirectoryError:
            raise StorageError(f"{url}: not a folder") from None

    def list_recursive(self, url):
        if not os.path.isdir(url):
            raise StorageNotFound(f"{url}: not found or not a folder")
        out = []
        for dirpath, dirnames, filenames in os.walk(url):
            dirnames.sort()
            out.extend(os.path.join(dirpath, name) for name in filenames)
        return sorted(out)

    def iter_files(self, url):
        if not os.path.isdir(url):
            raise StorageNotFound(f"{url}: not found or not a folder")
        for dirpath, dirnames, filenames in os.walk(url):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                st = os.stat(path)
                yield {"url": path, "size": st.st_size, "mtime": st.st_mtime}

    def open_read(self, url):
        try:
            return open(url, "rb")
        except FileNotFoundError:
            raise StorageNotFound(f"{url}: not found") from None

    def read_bytes(self, url, size=None):
        try:
            return _read_local(url, size)
        except FileNotFoundError:
            raise StorageNotFound(f"{url}: not found") from None

    def read_range(self, url, offset, length):
        try:
            with open(url, "rb") as f:
                f.seek(offset)
                return f.read(length)
        except FileNotFoundError:
            raise StorageNotFound(f"{url}: not found") from None

    def read_into(self, url, offset, length, out):
        try:
            fd = os.open(url, os.O_RDONLY)
        except FileNotFoundError:
            raise StorageNotFound(f"{url}: not found") from None
        try:
            if offset >= 0:  # a tar member
                return os.preadv(fd, [out], offset) if length == len(out) else length
            read = os.readv(fd, [out, _SPARE])  # one byte more: a file that grew reads long
            return read if read <= len(out) else os.fstat(fd).st_size
        finally:
            os.close(fd)

    def read_ends(self, url, head, tail, offset=None, length=None):
        try:
            fd = os.open(url, os.O_RDONLY)
        except FileNotFoundError:
            raise StorageNotFound(f"{url}: not found") from None
        try:
            base = offset or 0
            st = os.fstat(fd)
            size = st.st_size - base if length is None else length
            first = os.pread(fd, min(head, max(size, 0)), base)
            last = os.pread(fd, tail, base + size - tail) if size > head and tail else b""
            return first, last, size, (st.st_mtime if length is None else None)
        finally:
            os.close(fd)

    def write_bytes(self, url, data, durable=True):
        _atomic_local_write(url, lambda f: f.write(data), durable)

    def upload_file(self, local_path, url):
        if os.path.abspath(url) == os.path.abspath(local_path):
            return

        def copy(f):
            with open(local_path, "rb") as src:
                shutil.copyfileobj(src, f, _CHUNK)
        _atomic_local_write(url, copy)

    def download_file(self, url, local_path):
        if not os.path.exists(url):
            raise StorageNotFound(f"{url}: not found")
        self.upload_file(url, local_path)

    def staging_folder(self, folder_url):
        return folder_url or "."  # beside the destination: published by a rename on the same file system

    def publish(self, staging_path, url):
        with _output(url):
            os.chmod(staging_path, 0o644)  # mkstemp makes 0600; published files are readable
            os.replace(staging_path, url)

    def delete(self, url):
        try:
            os.unlink(url)
        except FileNotFoundError:
            pass

    def makedirs(self, url):
        with _output(url):
            os.makedirs(url, exist_ok=True)

    def check_writable(self, url):
        try:
            Path(url).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise output_error(err, url) or StorageError(f"{url}: cannot create output folder ({err.strerror})") from None
        if not os.access(url, os.W_OK):
            raise StorageError(f"{url}: output folder is not writable; fix the permissions or write elsewhere")


# ----------------------------------------------------------------------------- S3

class _S3Stream(io.RawIOBase):
    """A read-only stream over a GetObject body (no seeking)."""

    def __init__(self, url: str, body):
        self.url = url
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        from botocore import exceptions as bx

        try:
            data = self._body.read(len(buffer))
        except (bx.BotoCoreError, bx.ClientError) as err:
            raise _s3_error(err, self.url) from None
        n = len(data)
        buffer[:n] = data
        return n

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class S3Storage(Storage):
    """Objects in S3 or an S3-compatible store, through boto3."""

    def exists(self, url):
        if not split(url)[1]:  # the bucket itself
            _check_bucket(url)
            return True
        if _head(url) is not None:
            return True
        return any(True for _ in _iter_objects(url, delimiter="/"))

    def size(self, url):
        return self.stat(url)["size"]

    def stat(self, url):
        head = _head(url)
        if head is None:
            raise StorageNotFound(f"{url}: not found")
        return {"size": int(head["ContentLength"]), "mtime": head["LastModified"].timestamp(),
                "etag": head.get("ETag", "").strip('"')}

    def isdir(self, url):
        return any(True for _ in _iter_objects(url, delimiter="/"))

    def listdir(self, url):
        bucket, key = split(url)
        strip = len(key.rstrip("/") + "/") if key else 0
        names = set()
        for item in _iter_objects(url, delimiter="/"):
            name = (item.get("Prefix") or item["Key"])[strip:].rstrip("/")
            if name:
                names.add(name)
        return sorted(names)

    def list_recursive(self, url):
        return [item["url"] for item in sorted(self.iter_files(url), key=lambda item: item["url"])]

    def iter_files(self, url):
        bucket, _ = split(url)
        for item in _iter_objects(url):
            if "Key" in item:
                yield {"url": f"s3://{bucket}/{item['Key']}", "size": int(item["Size"]),
                       "mtime": item["LastModified"].timestamp()}

    def open_read(self, url):
        bucket, key = split(url)
        from botocore import exceptions as bx

        try:
            response = _client().get_object(Bucket=bucket, Key=key)
        except bx.ClientError as err:
            if err.response.get("Error", {}).get("Code") == "NoSuchKey":
                raise StorageNotFound(f"{url}: not found") from None
            raise _s3_error(err, url) from None
        except bx.BotoCoreError as err:
            raise _s3_error(err, url) from None
        return io.BufferedReader(_S3Stream(url, response["Body"]), buffer_size=1024 * 1024)

    def read_bytes(self, url, size=None):
        with self.open_read(url) as f:
            return f.read()

    def read_range(self, url, offset, length):
        bucket, key = split(url)
        response = _s3_call(url, _client().get_object, Bucket=bucket, Key=key,
                            Range=f"bytes={offset}-{offset + length - 1}")
        return _s3_call(url, response["Body"].read)

    def read_into(self, url, offset, length, out):
        data = self.read_bytes(url) if offset < 0 else self.read_range(url, offset, length)
        if len(data) <= len(out):
            out[:len(data)] = data
        return len(data)

    def write_bytes(self, url, data, durable=True):
        bucket, key = split(url)
        if len(data) < _settings.multipart_threshold:
            _s3_call(url, _client().put_object, Bucket=bucket, Key=key, Body=data)
        else:
            _s3_call(url, _client().upload_fileobj, io.BytesIO(data), bucket, key, Config=_transfer_config())

    def upload_file(self, local_path, url):
        bucket, key = split(url)
        if not os.path.exists(local_path):
            raise StorageNotFound(f"{local_path}: not found (upload to {url})")
        _s3_call(url, _client().upload_file, local_path, bucket, key, Config=_transfer_config())

    def download_file(self, url, local_path):
        bucket, key = split(url)
        directory = os.path.dirname(os.path.abspath(local_path))
        with _output(local_path):
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(local_path)}.", suffix=".tmp", dir=directory)
            os.close(fd)
            try:
                if _head(url) is None:
                    raise StorageNotFound(f"{url}: not found")
                _s3_call(url, _client().download_file, bucket, key, tmp, Config=_transfer_config())
                os.replace(tmp, local_path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)

    def staging_folder(self, folder_url):
        # in the temp folder, one sub-folder per destination prefix: a re-run finds what a killed writer left
        digest = hashlib.sha256(folder_url.rstrip("/").encode()).hexdigest()[:16]
        return os.path.join(tempfile.gettempdir(), "vitpipe-staging", digest)

    def publish(self, staging_path, url):
        self.upload_file(staging_path, url)  # the object appears when the (multipart) upload completes

    def delete(self, url):
        bucket, key = split(url)
        _s3_call(url, _client().delete_object, Bucket=bucket, Key=key)

    def check_writable(self, url):
        _check_bucket(url)


LOCAL, S3 = LocalStorage(), S3Storage()


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


def read_json(url: str | os.PathLike):
    data = read_bytes(url)
    try:
        return json.loads(data)
    except json.JSONDecodeError as err:
        raise StorageError(f"{url}: not valid JSON ({err.msg} at line {err.lineno})") from None


def sha256_url(url: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open_read(url) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_bytes(url: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    """Publish `data` at `url` whole (atomic rename locally). `durable=False` skips the local fsync:
    for records that are checked when read back, where a lost one only means redoing work (an
    fsync can wait a long time behind other writes: the whole journal is committed)."""
    store, url = backend(url)
    store.write_bytes(url, data, durable)


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
        sb, sk = split(src_url)
        db, dk = split(dst_url)
        _s3_call(dst_url, _client().copy, {"Bucket": sb, "Key": sk}, db, dk, Config=_transfer_config())
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
