"""Corrupt training samples are counted, not hidden (issue 14): a shard truncated on the real S3.

Before: `vitpipe pretrain` exited 0, run.json said complete, and the corrupt samples replaced by
neighbours were mentioned only inside a rank log. Now rank 0 reports the count (all ranks) in its
status records, it goes into run.json and the command's last lines, and above
data.max_corrupt_share (default 0.1 %) the run fails with one line naming the shard.
"""
from __future__ import annotations

import pytest

from pipeline import registry
from pipeline.cli import main
from pipeline.objectstore import free_port
from shards import shard_dataset, storage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
STEPS = 28  # one epoch of digits_tiny (64 per step): every shard is read


@pytest.fixture(scope="module")
def truncated(s3, digits_tree):
    url = s3.url("corrupt/digits")
    manifest = shard_dataset(str(digits_tree), url, name="digits", shard_size=200, seed=0)
    shard = manifest["shards"][0]["name"]
    data = storage.read_bytes(storage.join(url, shard))
    storage.write_bytes(storage.join(url, shard), data[: len(data) // 2])  # cut mid-shard, as an interrupted copy would
    return {"url": url, "shard": shard}


def _pretrain(data: str, out: str, *sets: str) -> int:
    args = ["pretrain", "--preset", "digits_tiny", "--data", data, "--out", out, "--steps", str(STEPS), "--nproc", "1",
            "--master-port", str(free_port()), "--retries", "0", "--set", "launch.cpu_threads_per_rank=1"]
    return main(args + [a for s in sets for a in ("--set", s)])


def test_too_many_corrupt_samples_fail_the_run_naming_the_shard(truncated, s3, tmp_path, capsys):
    root = str(tmp_path / "runs")
    assert _pretrain(truncated["url"], root) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vitpipe pretrain: error: rank 0 failed") and truncated["shard"] in err, err
    assert "data.max_corrupt_share=0.001" in err and "vitpipe verify" in err
    (run,) = registry.list_runs(root)
    assert run.status == "failed" and truncated["shard"] in storage.read_json(storage.join(run.url, "run.json"))["error"]


def test_corrupt_samples_below_the_share_are_counted_in_run_json_and_printed(truncated, s3, tmp_path, capsys):
    root = str(tmp_path / "runs")
    assert _pretrain(truncated["url"], root, "data.max_corrupt_share=0.5") == 0
    out = capsys.readouterr().out.strip().splitlines()
    (run,) = registry.list_runs(root)
    assert run.complete and 0 < run.metrics["corrupt_samples"] < 200
    assert out[-1] == f"corrupt samples: {run.metrics['corrupt_samples']} (each replaced by a neighbour); " \
                      "run `vitpipe verify` on the data"
