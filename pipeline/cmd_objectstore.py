"""`vitpipe objectstore up|down`: the embedded SeaweedFS S3 store for one machine (demo, local runs).

Data lives under `.vitpipe/objectstore` of the current directory (or --dir). `up` is idempotent:
if the store recorded in the pid file is running it just prints its endpoint again. The local
store uses fixed, well-known credentials (it listens on 127.0.0.1 only).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

LOCAL_ACCESS_KEY = "vitpipe"
LOCAL_SECRET_KEY = "vitpipe-local-secret"
DEFAULT_BUCKET = "vitpipe"
STATE_FILE = "objectstore.json"


def register(subparsers) -> None:
    p = subparsers.add_parser("objectstore", help="start/stop the embedded SeaweedFS S3 store (127.0.0.1)")
    sub = p.add_subparsers(dest="action", metavar="up|down", required=True)
    up = sub.add_parser("up", help="start the store (idempotent) and print the env lines to export")
    up.add_argument("--dir", default=".vitpipe/objectstore", help="data folder (default: .vitpipe/objectstore)")
    up.add_argument("--port", type=int, default=None, help="S3 port (default: a free one)")
    up.add_argument("--bucket", default=DEFAULT_BUCKET, help=f"bucket to create (default: {DEFAULT_BUCKET})")
    up.set_defaults(func=run_up)
    down = sub.add_parser("down", help="stop the store started by `up`")
    down.add_argument("--dir", default=".vitpipe/objectstore", help="data folder (default: .vitpipe/objectstore)")
    down.set_defaults(func=run_down)


def _state_path(directory: str) -> Path:
    return Path(directory).resolve() / STATE_FILE


def _print_env(state: dict) -> None:
    print(f"endpoint: {state['endpoint']}  bucket: s3://{state['bucket']}  pid: {state['pid']}")
    print(f"export AWS_ENDPOINT_URL={state['endpoint']}")
    print(f"export AWS_ACCESS_KEY_ID={LOCAL_ACCESS_KEY}")
    print(f"export AWS_SECRET_ACCESS_KEY={LOCAL_SECRET_KEY}")
    print("export AWS_DEFAULT_REGION=us-east-1")


def run_up(args) -> int:
    from pipeline.objectstore import pid_alive, start_seaweedfs

    state_path = _state_path(args.dir)
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if pid_alive(int(state["pid"])):
            _print_env(state)
            return 0
        state_path.unlink()
    store = start_seaweedfs(args.dir, access_key=LOCAL_ACCESS_KEY, secret_key=LOCAL_SECRET_KEY, port=args.port,
                            buckets=(args.bucket,))
    state = {"endpoint": store.endpoint, "pid": store.pid, "bucket": args.bucket, "log": store.log_path}
    tmp = state_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, state_path)
    store._process = None  # keep running after this command exits; `down` stops it by pid
    _print_env(state)
    return 0


def run_down(args) -> int:
    from pipeline.objectstore import stop_pid

    state_path = _state_path(args.dir)
    if not state_path.exists():
        print(f"no object store recorded in {state_path}; nothing to stop")
        return 0
    state = json.loads(state_path.read_text())
    stopped = stop_pid(int(state["pid"]))
    state_path.unlink()
    print(f"stopped object store pid {state['pid']}" if stopped else f"object store pid {state['pid']} was not running")
    return 0
