"""The embedded SeaweedFS store: starts, serves authenticated S3, refuses wrong keys, stops by pid."""
from __future__ import annotations

import boto3
import pytest
from botocore.exceptions import ClientError

from pipeline.objectstore import pid_alive, start_seaweedfs


@pytest.mark.integration
def test_s3_fixture_serves_authenticated_s3(s3):
    client = s3.client()
    client.put_object(Bucket=s3.bucket, Key="objectstore/hello.txt", Body=b"hello")
    assert client.get_object(Bucket=s3.bucket, Key="objectstore/hello.txt")["Body"].read() == b"hello"
    bad = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.access_key,
                       aws_secret_access_key="wrong-secret", region_name="us-east-1")
    with pytest.raises(ClientError):
        bad.get_object(Bucket=s3.bucket, Key="objectstore/hello.txt")
    assert s3.url("a/b/") == f"s3://{s3.bucket}/a/b"


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_second_store_runs_beside_and_stops_by_pid(s3, tmp_path):
    store = start_seaweedfs(tmp_path / "data", access_key="k2-access", secret_key="k2-secret", buckets=("second",))
    try:
        assert store.endpoint != s3.endpoint
        client = store.client()
        client.put_object(Bucket="second", Key="x", Body=b"1")
        assert [o["Key"] for o in client.list_objects_v2(Bucket="second")["Contents"]] == ["x"]
    finally:
        store.stop()
    assert not pid_alive(store.pid)


@pytest.mark.timeout(120)
@pytest.mark.integration
def test_cli_objectstore_up_is_idempotent_and_down_stops_it(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = lambda *args: subprocess.run([sys.executable, "-m", "pipeline.cli", "objectstore", *args], cwd=tmp_path,
                                       capture_output=True, text=True, timeout=90,
                                       env={**__import__("os").environ, "PYTHONPATH": str(root)})
    first = run("up")
    assert first.returncode == 0, first.stderr
    state = json.loads((tmp_path / ".vitpipe" / "objectstore" / "objectstore.json").read_text())
    try:
        assert f"export AWS_ENDPOINT_URL={state['endpoint']}" in first.stdout
        again = run("up")
        assert again.returncode == 0 and again.stdout == first.stdout  # same server, not a second one
        client = boto3.client("s3", endpoint_url=state["endpoint"], aws_access_key_id="vitpipe",
                              aws_secret_access_key="vitpipe-local-secret", region_name="us-east-1")
        assert "vitpipe" in [b["Name"] for b in client.list_buckets()["Buckets"]]
    finally:
        down = run("down")
    assert down.returncode == 0 and f"stopped object store pid {state['pid']}" in down.stdout
    assert not pid_alive(state["pid"])
