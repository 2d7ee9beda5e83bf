"""The one object-storage layer: local paths and `s3://bucket/key` URLs behind the same functions.

S3 goes through boto3 with botocore's retry config (transient errors retried with backoff) and
multipart transfers for big files. The endpoint comes from `AWS_ENDPOINT_URL` (boto3 reads it)
or `configure(endpoint_url=...)` called once at an entry point; credentials come from the
standard AWS chain and are never logged. Writes are atomic: a local file appears by rename,
an S3 object appears when its (multipart) upload completes.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

_CHUNK = 8 * 1024 * 1024


class StorageError(RuntimeError):
    """Object storage failed; the message names the URL and what to do."""


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

def is_s3(url: str | os.PathLike) -> bool:
    return str(url).startswith("s3://")


def _local(url: str | os.PathLike) -> str:
    url = str(url)
    return url[len("file://"):] if url.startswith("file://") else url


def split(url: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key)."""
    if not is_s3(url):
        raise StorageError(f"{url}: not an s3:// URL")
    rest = url[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"{url}: missing bucket name; write s3://BUCKET/PREFIX")
    return bucket, key


def join(url: str | os.PathLike, *parts: str) -> str:
    url = str(url)
    if is_s3(url):
        out = url.rstrip("/")
        for part in parts:
            out = f"{out}/{str(part).strip('/')}"
        return out
    return os.path.join(_local(url), *parts)


def basename(url: str) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[-1]


def parent(url: str) -> str:
    url = str(url).rstrip("/")
    if is_s3(url):
        return url.rsplit("/", 1)[0]
    return os.path.dirname(_local(url))


# ----------------------------------------------------------------------------- S3 client

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
        return StorageError(f"{url}: cannot reach S3 endpoint {_endpoint_name()}; start the store "
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
        return StorageError(f"{url}: S3 error {code or status} from {_endpoint_name()}")
    if isinstance(err, bx.BotoCoreError):
        return StorageError(f"{url}: S3 failure talking to {_endpoint_name()}: {type(err).__name__}")
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


# ----------------------------------------------------------------------------- queries

def exists(url: str | os.PathLike) -> bool:
    url = str(url)
    if not is_s3(url):
        return os.path.exists(_local(url))
    if not split(url)[1]:  # the bucket itself
        _check_bucket(url)
        return True
    if _head(url) is not None:
        return True
    return any(True for _ in _iter_objects(url, delimiter="/"))


def size(url: str | os.PathLike) -> int:
    url = str(url)
    if not is_s3(url):
        try:
            return os.path.getsize(_local(url))
        except FileNotFoundError:
            raise StorageNotFound(f"{url}: not found") from None
    head = _head(url)
    if head is None:
        raise StorageNotFound(f"{url}: not found")
    return int(head["ContentLength"])


def isdir(url: str | os.PathLike) -> bool:
    url = str(url)
    if not is_s3(url):
        return os.path.isdir(_local(url))
    return any(True for _ in _iter_objects(url, delimiter="/"))


def listdir(url: str | os.PathLike) -> list[str]:
    """Names directly under a folder / prefix, sorted."""
    url = str(url)
    if not is_s3(url):
        try:
            return sorted(os.listdir(_local(url)))
        except FileNotFoundError:
            raise StorageNotFound(f"{url}: not found") from None
        except NotADirectoryError:
            raise StorageError(f"{url}: not a folder") from None
    bucket, key = split(url)
    strip = len(key.rstrip("/") + "/") if key else 0
    names = set()
    for item in _iter_objects(url, delimiter="/"):
        name = (item.get("Prefix") or item["Key"])[strip:].rstrip("/")
        if name:
            names.add(name)
    return sorted(names)


def list_recursive(url: str | os.PathLike) -> list[str]:
    """Full URLs of every file under a folder / prefix, sorted."""
    url = str(url)
    if not is_s3(url):
        root = _local(url)
        if not os.path.isdir(root):
            raise StorageNotFound(f"{url}: not found or not a folder")
        out = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            out.extend(os.path.join(dirpath, name) for name in filenames)
        return sorted(out)
    bucket, _ = split(url)
    return sorted(f"s3://{bucket}/{item['Key']}" for item in _iter_objects(url) if "Key" in item)


def walk(url: str | os.PathLike) -> list[dict]:
    """Every file under a folder / prefix as {'url', 'size', 'mtime'}, sorted by url (one listing, no heads)."""
    url = str(url)
    if not is_s3(url):
        out = []
        for path in list_recursive(url):
            st = os.stat(path)
            out.append({"url": path, "size": st.st_size, "mtime": st.st_mtime})
        return out
    bucket, _ = split(url)
    items = [{"url": f"s3://{bucket}/{item['Key']}", "size": int(item["Size"]),
              "mtime": item["LastModified"].timestamp()} for item in _iter_objects(url) if "Key" in item]
    return sorted(items, key=lambda item: item["url"])


def iter_files(url: str | os.PathLike) -> Iterator[dict]:
    """Like walk(), but streamed (locally: sorted per folder; S3: key order) for huge trees."""
    url = str(url)
    if is_s3(url):
        bucket, _ = split(url)
        for item in _iter_objects(url):
            if "Key" in item:
                yield {"url": f"s3://{bucket}/{item['Key']}", "size": int(item["Size"]),
                       "mtime": item["LastModified"].timestamp()}
        return
    root = _local(url)
    if not os.path.isdir(root):
        raise StorageNotFound(f"{url}: not found or not a folder")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            yield {"url": path, "size": st.st_size, "mtime": st.st_mtime}


def read_range(url: str | os.PathLike, offset: int, length: int) -> bytes:
    """`length` bytes of a file from `offset` (an S3 ranged GET; a seek locally)."""
    url = str(url)
    if length <= 0:
        return b""
    if not is_s3(url):
        try:
            with open(_local(url), "rb") as f:
                f.seek(offset)
                return f.read(length)
        except FileNotFoundError:
            raise StorageNotFound(f"{url}: not found") from None
    bucket, key = split(url)
    response = _s3_call(url, _client().get_object, Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}")
    return _s3_call(url, response["Body"].read)


def stat(url: str | os.PathLike) -> dict:
    """{'size', 'mtime' (float or None), 'etag' (S3 only)} of one file."""
    url = str(url)
    if not is_s3(url):
        st = os.stat(_local(url))
        return {"size": st.st_size, "mtime": st.st_mtime, "etag": None}
    head = _head(url)
    if head is None:
        raise StorageNotFound(f"{url}: not found")
    return {"size": int(head["ContentLength"]), "mtime": head["LastModified"].timestamp(),
            "etag": head.get("ETag", "").strip('"')}


# ----------------------------------------------------------------------------- reading

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


def open_read(url: str | os.PathLike) -> BinaryIO:
    """A binary stream of the file; S3 objects are streamed, not downloaded first."""
    url = str(url)
    if not is_s3(url):
        try:
            return open(_local(url), "rb")
        except FileNotFoundError:
            raise StorageNotFound(f"{url}: not found") from None
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


def read_bytes(url: str | os.PathLike, *, size: int | None = None) -> bytes:
    """A whole file. `size`: what it is expected to hold, when known (saves a stat locally; a file
    of another size is still read whole, for the caller to notice)."""
    url = str(url)
    if not is_s3(url):
        try:
            return _read_local(_local(url), size)
        except FileNotFoundError:
            raise StorageNotFound(f"{url}: not found") from None
    with open_read(url) as f:
        return f.read()


def read_record(url: str, offset: int = -1, length: int = -1, *, size: int | None = None) -> bytes:
    """One record's bytes: the whole file at `url` (offset < 0; `size` as in read_bytes), or the
    `length` bytes at `offset` in it (a tar member)."""
    return read_bytes(url, size=size) if offset < 0 else read_range(url, offset, length)


_SPARE = bytearray(1)


def read_record_into(url: str, offset: int, length: int, out) -> int:
    """Read a record (as read_record) into `out`, a writable buffer of the size it is expected to
    have; returns the record's size. A size other than len(out) means the record changed: then
    `out` holds a part of it, or the whole of it at its start."""
    if is_s3(url):
        data = read_record(url, offset, length)
        if len(data) <= len(out):
            out[:len(data)] = data
        return len(data)
    try:
        fd = os.open(_local(url), os.O_RDONLY)
    except FileNotFoundError:
        raise StorageNotFound(f"{url}: not found") from None
    try:
        if offset >= 0:  # a tar member
            return os.preadv(fd, [out], offset) if length == len(out) else length
        read = os.readv(fd, [out, _SPARE])  # one byte more: a file that grew reads long
        return read if read <= len(out) else os.fstat(fd).st_size
    finally:
        os.close(fd)


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


def read_ends(url: str | os.PathLike, head: int, tail: int, offset: int | None = None,
              length: int | None = None) -> tuple[bytes, bytes, int, float | None] | None:
    """(first `head` bytes, last `tail` bytes, size, mtime) of a local file, or of the `length` bytes
    at `offset` in it (a tar member; mtime None), without reading the middle. The tail is empty when
    the head holds everything. None for an s3:// URL: one GET of the whole object is the cheaper request."""
    url = str(url)
    if is_s3(url):
        return None
    try:
        fd = os.open(_local(url), os.O_RDONLY)
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


# ----------------------------------------------------------------------------- writing

def _atomic_local_write(path: str, write, durable: bool = True) -> None:
    directory = os.path.dirname(os.path.abspath(path))
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


def write_bytes(url: str | os.PathLike, data: bytes, *, durable: bool = True) -> None:
    """Publish `data` at `url` whole (atomic rename locally). `durable=False` skips the local fsync:
    for records that are checked when read back, where a lost one only means redoing work (an
    fsync can wait a long time behind other writes: the whole journal is committed)."""
    url = str(url)
    if not is_s3(url):
        _atomic_local_write(_local(url), lambda f: f.write(data), durable)
        return
    bucket, key = split(url)
    if len(data) < _settings.multipart_threshold:
        _s3_call(url, _client().put_object, Bucket=bucket, Key=key, Body=data)
    else:
        _s3_call(url, _client().upload_fileobj, io.BytesIO(data), bucket, key, Config=_transfer_config())


def write_json(url: str | os.PathLike, obj, *, durable: bool = True) -> None:
    write_bytes(url, (json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n").encode("utf-8"),
                durable=durable)


def upload_file(local_path: str | os.PathLike, url: str | os.PathLike) -> None:
    """Publish a local file at `url` (multipart above the threshold; atomic either way)."""
    url, local_path = str(url), str(local_path)
    if not is_s3(url):
        dst = _local(url)
        if os.path.abspath(dst) == os.path.abspath(local_path):
            return
        def copy(f):
            with open(local_path, "rb") as src:
                shutil.copyfileobj(src, f, _CHUNK)
        _atomic_local_write(dst, copy)
        return
    bucket, key = split(url)
    if not os.path.exists(local_path):
        raise StorageNotFound(f"{local_path}: not found (upload to {url})")
    _s3_call(url, _client().upload_file, local_path, bucket, key, Config=_transfer_config())


def download_file(url: str | os.PathLike, local_path: str | os.PathLike) -> None:
    url, local_path = str(url), str(local_path)
    if not is_s3(url):
        src = _local(url)
        if not os.path.exists(src):
            raise StorageNotFound(f"{url}: not found")
        upload_file(src, local_path)
        return
    bucket, key = split(url)
    directory = os.path.dirname(os.path.abspath(local_path))
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


def copy(src_url: str | os.PathLike, dst_url: str | os.PathLike) -> None:
    """Copy one file between any two URLs."""
    src_url, dst_url = str(src_url), str(dst_url)
    if is_s3(src_url) and is_s3(dst_url):
        sb, sk = split(src_url)
        db, dk = split(dst_url)
        _s3_call(dst_url, _client().copy, {"Bucket": sb, "Key": sk}, db, dk, Config=_transfer_config())
    elif is_s3(src_url):
        download_file(src_url, _local(dst_url))
    else:
        upload_file(_local(src_url), dst_url)


def copy_tree(src_url: str | os.PathLike, dst_url: str | os.PathLike) -> list[str]:
    """Copy every file under a folder / prefix to another (either direction); returns the new URLs."""
    src_url, dst_url = str(src_url).rstrip("/"), str(dst_url).rstrip("/")
    out = []
    for url in list_recursive(src_url):
        rel = url[len(src_url):].lstrip("/")
        if not is_s3(src_url):
            rel = os.path.relpath(url, _local(src_url)).replace(os.sep, "/")
        target = join(dst_url, *rel.split("/"))
        copy(url, target)
        out.append(target)
    return out


def delete(url: str | os.PathLike) -> None:
    """Delete one file (missing is fine)."""
    url = str(url)
    if not is_s3(url):
        try:
            os.unlink(_local(url))
        except FileNotFoundError:
            pass
        return
    bucket, key = split(url)
    _s3_call(url, _client().delete_object, Bucket=bucket, Key=key)


def makedirs(url: str | os.PathLike) -> None:
    """Create a local folder (S3 prefixes need no creation)."""
    if not is_s3(url):
        os.makedirs(_local(url), exist_ok=True)


def check_writable(url: str | os.PathLike) -> None:
    """Fail early with a one-line error if `url` (a folder or prefix) cannot be written."""
    url = str(url)
    if not is_s3(url):
        path = Path(_local(url))
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(f"{url}: cannot create output folder ({err.strerror})") from None
        if not os.access(path, os.W_OK):
            raise StorageError(f"{url}: output folder is not writable")
        return
    _check_bucket(url)
