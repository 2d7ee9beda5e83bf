"""Files on a local (or mounted) file system."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from shards.storage.base import CHUNK, Storage, StorageError, StorageNotFound, _output, output_error


def _atomic_local_write(path: str, write, durable: bool = True) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    with _output(path):
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w+b") as f:  # readable too: a writer may read back what it wrote
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

    def write_with(self, url, write, durable=True):
        _atomic_local_write(url, write, durable)

    def upload_file(self, local_path, url):
        if os.path.abspath(url) == os.path.abspath(local_path):
            return

        def copy(f):
            with open(local_path, "rb") as src:
                shutil.copyfileobj(src, f, CHUNK)
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
            mapped = output_error(err, url)
            raise mapped or StorageError(f"{url}: cannot create output folder ({err.strerror})") from None
        if not os.access(url, os.W_OK):
            raise StorageError(f"{url}: output folder is not writable; fix the permissions or write elsewhere")
