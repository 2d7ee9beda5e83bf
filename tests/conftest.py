"""Session fixtures shared by every test file (owner: shards).

`s3`: one real SeaweedFS server for the whole session (free ports, auth on, a bucket created),
with AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION set for
the session so boto3, subprocesses and `shards.storage` all reach it.
`digits_tree`: scikit-learn's digits as an ImageNet-style class-folder tree.
`digits_shards`: that tree sharded to a local folder (manifest + tars).
`small_disk`: a real 256 KiB file system (tmpfs), for disk-full and read-only outputs.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

S3_ACCESS_KEY = "vitpipe-test-key"
S3_SECRET_KEY = "vitpipe-test-secret"
S3_BUCKET = "vitpipe-test"


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str = field(repr=False)
    pid: int = 0
    data_dir: str = ""

    def url(self, prefix: str = "") -> str:
        prefix = str(prefix).strip("/")
        return f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1")


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    from pipeline.objectstore import start_seaweedfs
    from shards import storage

    store = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"), access_key=S3_ACCESS_KEY,
                            secret_key=S3_SECRET_KEY, buckets=(S3_BUCKET,))
    server = S3Server(endpoint=store.endpoint, bucket=S3_BUCKET, access_key=S3_ACCESS_KEY,
                      secret_key=S3_SECRET_KEY, pid=store.pid, data_dir=store.data_dir)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in server.env.items():
            mp.setenv(key, value)
        storage.reset_clients()
        try:
            yield server
        finally:
            storage.reset_clients()
            store.stop()


@pytest.fixture(scope="session")
def digits_tree(tmp_path_factory) -> Path:
    from shards.digits import write_digits_tree

    return write_digits_tree(tmp_path_factory.mktemp("digits") / "tree")


@pytest.fixture(scope="session")
def digits_shards(digits_tree, tmp_path_factory) -> str:
    """The digits tree sharded to a local folder: 9 shards of <= 200 samples, seed 0, name 'digits'."""
    from shards import shard_dataset

    out = tmp_path_factory.mktemp("digits-shards") / "digits"
    shard_dataset(str(digits_tree), str(out), name="digits", shard_size=200, seed=0)
    return str(out)


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB file system (tmpfs; needs root, which these machines give)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode:
        pytest.fail(f"cannot mount a tmpfs here ({proc.stderr.strip()}); the disk-full tests need one")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)
