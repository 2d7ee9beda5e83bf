"""What every store shares: the Storage interface, its errors, and outputs the user has to fix."""
from __future__ import annotations

import errno
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import BinaryIO, Iterator

from shards.errors import VitpipeError

CHUNK = 8 * 1024 * 1024


class StorageError(VitpipeError, RuntimeError):
    """Object storage failed; the message names the URL and what to do. `transient`: the store could
    not be reached or answered with a server error, so a retry may succeed (kept when pickled from a
    worker process: exceptions pickle their __dict__)."""

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient
        self.exit_code = 1 if transient else 2  # a store that is down fails the job; a bad URL, bucket or key is input


class StorageNotFound(StorageError, FileNotFoundError):
    """The URL does not exist."""


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
    def write_with(self, url: str, write, durable: bool = True) -> None:
        """Publish at `url` whole what write(file) writes to a binary file (readable too)."""

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
