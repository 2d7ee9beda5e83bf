"""Sharding on a real Dask cluster (`dask scheduler` + `dask worker` processes on 127.0.0.1) from
and to the real SeaweedFS store: the same bytes as one machine for any number of workers and
partitions, a worker killed mid-partition, a coordinator killed mid-plan."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shards import shard_dataset, storage
from shards.workers import LoopbackCluster

_SCAN_RECORD = re.compile(r"[0-9a-f]{16}-(\d{8})-(\d{8})\.npz")

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"name": "d", "shard_size": 70, "seed": 5}


@pytest.fixture(scope="module")
def s3_digits(s3, digits_tree) -> str:
    """30 digits of each class (10 class folders, 300 PNGs) under an S3 prefix: workers need no
    shared file system."""
    url = s3.url("sources/digits")
    for folder in sorted(digits_tree.iterdir()):
        for path in sorted(folder.iterdir())[:30]:
            storage.copy(str(path), f"{url}/{folder.name}/{path.name}")
    return url


@pytest.fixture(scope="module")
def one_machine(s3_digits, tmp_path_factory) -> dict[str, bytes]:
    """The dataset made in this process with one partition: {file name: bytes}."""
    out = tmp_path_factory.mktemp("one_machine")
    manifest = shard_dataset(s3_digits, str(out), workers=1, partitions=1, **SETTINGS)
    return {s["name"]: (out / s["name"]).read_bytes() for s in manifest["shards"]}


def _shards_at(url: str) -> dict[str, bytes]:
    manifest = storage.read_json(f"{url}/manifest.json")
    return {s["name"]: storage.read_bytes(f"{url}/{s['name']}") for s in manifest["shards"]}


def _records(url: str) -> list[dict]:
    folder = f"{url}/_plan"
    return list(storage.iter_files(folder)) if storage.exists(folder) else []


def _units_recorded(url: str) -> int:
    """The units held by the scan records among the plan's files (shards.partitions names a record
    `<scan id>-<first unit>-<last unit>.npz`; the plan's state and route files are .npz too)."""
    names = [_SCAN_RECORD.fullmatch(storage.basename(item["url"])) for item in _records(url)]
    return sum(int(m[2]) - int(m[1]) + 1 for m in names if m)


def _cli(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([str(Path(sys.executable).parent / "vitpipe"), "shard", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_same_bytes_for_one_machine_two_workers_a_killed_worker_one_worker_and_any_partitions(s3, s3_digits,
                                                                                              one_machine):
    env = dict(os.environ, **s3.env)
    with LoopbackCluster(2, env=env) as cluster:
        # the user's path: the CLI, the cluster from VITPIPE_DASK_ADDRESS, 7 partitions
        out = s3.url("dask/two")
        proc = _cli(s3_digits, out, "--name", "d", "--shard-size", "70", "--seed", "5", "--partitions", "7",
                    env=dict(env, VITPIPE_DASK_ADDRESS=cluster.address))
        log = proc.communicate(timeout=180)[0]
        assert proc.returncode == 0, log
        assert f"with the Dask cluster at {cluster.address}" in log
        assert _shards_at(out) == one_machine
        assert not _records(out)  # complete: the scan records are gone

        # a worker SIGKILLed while it scans: the scheduler runs its partitions again on the other
        out = s3.url("dask/killed")
        result: dict = {}
        run = threading.Thread(target=lambda: result.update(shard_dataset(
            s3_digits, out, dask=cluster.address, partitions=10, resize=16, **SETTINGS)))
        run.start()
        deadline = time.monotonic() + 120
        while not _records(out) and time.monotonic() < deadline:  # the first class folder is scanned
            time.sleep(0.02)
        victim = cluster.workers[1]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        run.join(timeout=180)
        assert result, "the run did not finish after a worker was killed"
        reference = shard_dataset(s3_digits, s3.url("dask/one_machine_resized"), workers=1, partitions=1, resize=16,
                                  **SETTINGS)
        assert result["shards"] == reference["shards"]
        assert _shards_at(out) == _shards_at(s3.url("dask/one_machine_resized"))

        # what is left: one worker, 3 partitions
        out = s3.url("dask/one")
        shard_dataset(s3_digits, out, dask=cluster.address, partitions=3, **SETTINGS)
        assert _shards_at(out) == one_machine


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_a_coordinator_killed_mid_plan_resumes_from_the_scan_records(s3, s3_digits, one_machine):
    env = dict(os.environ, **s3.env)
    out = s3.url("dask/coordinator")
    with LoopbackCluster(2, env=env) as cluster:
        args = (s3_digits, out, "--dask", cluster.address, "--name", "d", "--shard-size", "70", "--seed", "5",
                "--partitions", "10")
        proc = _cli(*args, env=env)
        deadline = time.monotonic() + 120
        while _units_recorded(out) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not storage.exists(f"{out}/manifest.json")
        kept = _units_recorded(out)
        assert kept >= 3
        # a re-run with other partitions: the records are per class folder, so they still count
        proc = _cli(*args[:-1], "4", env=env)
        log = proc.communicate(timeout=180)[0]
        assert proc.returncode == 0, log
        reused = int(log.split("plan: ", 1)[1].split(" unit(s)", 1)[0])
        assert kept <= reused <= 10, log
    assert _shards_at(out) == one_machine


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_loopback_cluster_removes_the_log_folder_it_made(tmp_path, monkeypatch):
    """Without `log_dir` the scheduler's and worker's logs go to a temporary folder removed on exit;
    a `log_dir` given by the caller stays with its logs."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkdtemp makes its folders
    with LoopbackCluster(1):
        made = list(tmp_path.glob("vitpipe-dask-*"))
        assert len(made) == 1 and {p.name for p in made[0].iterdir()} == {"scheduler.log", "worker0.log"}
    assert not made[0].exists()
    kept = tmp_path / "logs"
    kept.mkdir()
    with LoopbackCluster(1, log_dir=str(kept)):
        pass
    assert {p.name for p in kept.iterdir()} == {"scheduler.log", "worker0.log"}
    assert (kept / "scheduler.log").stat().st_size
    assert list(tmp_path.glob("vitpipe-dask-*")) == []
