"""Objects in S3 or an S3-compatible store, through boto3 (botocore's retries; multipart transfers).

The endpoint comes from AWS_ENDPOINT_URL (boto3 reads it) or `configure(endpoint_url=...)` called
once at an entry point; credentials come from the standard AWS chain and are never logged.
URLs reaching this module are `s3://BUCKET[/KEY]`, checked by `shards.storage.backend`.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
from dataclasses import dataclass
from typing import Iterator

from shards.storage.base import Storage, StorageError, StorageNotFound, _output


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


def split(url: str) -> tuple[str, str]:
    """`s3://bucket/key` -> (bucket, key)."""
    bucket, _, key = url[len("s3://"):].partition("/")
    return bucket, key


_ENDS_FIRST = 64 << 10  # read_ends' first ranged GET asks for at least this many bytes


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
                            "(`vitpipe objectstore up`) or fix AWS_ENDPOINT_URL / --s3-endpoint", transient=True)
    if isinstance(err, bx.ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            bucket = split(url)[0] if url.startswith("s3://") else "?"
            return StorageError(f"{url}: bucket '{bucket}' does not exist at {_endpoint_name()}; create it "
                                "or fix the URL")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return StorageNotFound(f"{url}: not found")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden",
                    "InvalidToken", "ExpiredToken") or status == 403:
            return StorageError(f"{url}: access denied by {_endpoint_name()} ({code}); check AWS_ACCESS_KEY_ID / "
                                "AWS_SECRET_ACCESS_KEY and the bucket's permissions")
        return StorageError(f"{url}: S3 error {code or status} from {_endpoint_name()}",
                            transient=isinstance(status, int) and status >= 500)
    if isinstance(err, bx.BotoCoreError):  # timeouts, connections cut mid-transfer: worth a retry
        return StorageError(f"{url}: S3 failure talking to {_endpoint_name()}: {type(err).__name__}", transient=True)
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

    def read_ends(self, url, head, tail, offset=None, length=None):
        """Ranged GETs: the first `head` bytes (and with them the size), then the last `tail` bytes
        only when the head did not hold everything; None for an empty object (no range to ask for).
        The first GET asks for at least _ENDS_FIRST bytes: a record up to that size is then one request
        (returned whole, tail empty), as a request costs more than the bytes it saves."""
        from botocore import exceptions as bx

        bucket, key = split(url)
        base = offset or 0
        want = max(head, _ENDS_FIRST) if length is None else min(max(head, _ENDS_FIRST), length)
        if want <= 0:
            return None
        whole = length is None and want >= 1 << 40  # all of it asked for: one plain GET
        try:
            response = (_client().get_object(Bucket=bucket, Key=key) if whole else
                        _client().get_object(Bucket=bucket, Key=key, Range=f"bytes={base}-{base + want - 1}"))
        except bx.ClientError as err:
            if err.response.get("Error", {}).get("Code") == "InvalidRange":
                return None
            if err.response.get("Error", {}).get("Code") == "NoSuchKey":
                raise StorageNotFound(f"{url}: not found") from None
            raise _s3_error(err, url) from None
        except bx.BotoCoreError as err:
            raise _s3_error(err, url) from None
        first = _s3_call(url, response["Body"].read)
        total = response.get("ContentRange", "").rpartition("/")[2]
        size = length if length is not None else int(total) if total.isdigit() else int(response["ContentLength"])
        mtime = response["LastModified"].timestamp() if length is None else None
        if size <= len(first):
            return first[:size], b"", size, mtime
        first = first[:head]
        if not tail:
            return first, b"", size, mtime
        start = base + size - tail
        last = _s3_call(url, lambda: _client().get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{start + tail - 1}")
                        ["Body"].read())
        return first, last, size, mtime

    def read_into(self, url, offset, length, out):
        data = self.read_bytes(url) if offset < 0 else self.read_range(url, offset, length)
        if len(data) <= len(out):
            out[:len(data)] = data
        return len(data)

    def write_bytes(self, url, data, durable=True):
        self._put(url, data if len(data) < _settings.multipart_threshold else io.BytesIO(data), len(data))

    def write_with(self, url, write, durable=True):
        with tempfile.TemporaryFile() as f:  # no name: nothing left behind if this process is killed
            write(f)
            size = f.seek(0, os.SEEK_END)
            f.seek(0)
            self._put(url, f, size)

    def _put(self, url, body, size: int) -> None:
        """One PUT of `body` (bytes or a binary file) under the multipart threshold, else a multipart upload."""
        bucket, key = split(url)
        if size < _settings.multipart_threshold:
            _s3_call(url, _client().put_object, Bucket=bucket, Key=key, Body=body)
        else:
            _s3_call(url, _client().upload_fileobj, body, bucket, key, Config=_transfer_config())

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

    def copy_object(self, src_url: str, dst_url: str) -> None:
        """Copy an object to another key, inside the store."""
        (src_bucket, src_key), (dst_bucket, dst_key) = split(src_url), split(dst_url)
        _s3_call(dst_url, _client().copy, {"Bucket": src_bucket, "Key": src_key}, dst_bucket, dst_key,
                 Config=_transfer_config())

    def delete(self, url):
        bucket, key = split(url)
        _s3_call(url, _client().delete_object, Bucket=bucket, Key=key)

    def check_writable(self, url):
        _check_bucket(url)
