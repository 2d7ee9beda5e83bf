"""`vitpipe demo`: the whole pipeline on one machine, with every part real.

1. start the embedded object store (SeaweedFS `weed mini` on 127.0.0.1, a bucket);
2. write scikit-learn's digits as ImageNet-style class-folder trees: pretraining on digits
   0-4, fine-tuning and evaluation on the *different* label set 5-9 (val split for eval);
3. run the Prefect flow ``vit_pipeline`` on Prefect's local ephemeral API: shard the trees
   into the object store (one task per shard) -> pretrain a tiny ViT with DeepSpeed on 2 local
   ranks at 16 px -> fine-tune at 32 px with a zero-initialised head -> evaluate -> report;
4. print the accuracy, the run ids, the exact commands to fetch the artifacts, and LAST one
   JSON line.

The object store keeps running afterwards (so the printed commands work); its address and
credentials are in ``<workdir>/s3.env`` (never printed). ``vitpipe demo --stop`` stops it.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shards import storage
from vit.config import ConfigError

BUCKET = "vitpipe-demo"
PRETRAIN_CLASSES = ("0", "1", "2", "3", "4")
FINETUNE_CLASSES = ("5", "6", "7", "8", "9")


@dataclass(frozen=True)
class DemoSettings:
    workdir: str = ".vitpipe/demo"
    nproc: int = 2
    pretrain_steps: int | None = None  # None: the digits_tiny_aug preset's
    finetune_steps: int | None = None  # None: the digits_tiny_ft preset's
    shard_size: int = 100
    task_runner: str = "dask"  # dask (local worker processes) | threads

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise ConfigError(f"--nproc {self.nproc}: needs at least 1 rank")
        if self.shard_size < 1:
            raise ConfigError(f"shard_size={self.shard_size}: must be >= 1")


def say(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- object store


def _state_path(workdir: Path) -> Path:
    return workdir / "objectstore.json"


def env_file(workdir: str | Path) -> Path:
    return Path(workdir) / "s3.env"


def ensure_store(workdir: Path) -> dict[str, str]:
    """A running local object store for the demo (reused when one from an earlier demo answers)."""
    from pipeline.objectstore import pid_alive, start_seaweedfs

    state_file = _state_path(workdir)
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if pid_alive(state["pid"]) and _answers(state["env"]):
            say(f"object store already running at {state['env']['AWS_ENDPOINT_URL']} (pid {state['pid']})")
            return state["env"]
    access_key, secret_key = f"demo-{secrets.token_hex(4)}", secrets.token_hex(16)
    say("starting the object store (SeaweedFS weed mini on 127.0.0.1) ...")
    store = start_seaweedfs(workdir / "seaweedfs", access_key=access_key, secret_key=secret_key, buckets=(BUCKET,))
    env = store.env()
    workdir.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"pid": store.pid, "env": env}))
    os.chmod(state_file, 0o600)
    env_path = env_file(workdir)
    env_path.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    os.chmod(env_path, 0o600)
    say(f"object store up at {store.endpoint} (pid {store.pid}); credentials in {env_path}")
    return env


def _answers(env: dict[str, str]) -> bool:
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"],
                          config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))
    try:
        client.head_bucket(Bucket=BUCKET)
        return True
    except Exception:
        return False


def stop_store(workdir: str | Path) -> bool:
    from pipeline.objectstore import stop_pid

    state_file = _state_path(Path(workdir))
    if not state_file.exists():
        return False
    stopped = stop_pid(json.loads(state_file.read_text())["pid"])
    state_file.unlink()
    return stopped


# ----------------------------------------------------------------------------- data


def write_trees(data_dir: Path) -> dict[str, Path]:
    """Digits 0-4 (train split) for pretraining; 5-9 train / val for fine-tuning / evaluation."""
    from shards.digits import write_digits_tree

    out = {"pretrain": data_dir / "pretrain", "finetune": data_dir / "finetune", "eval": data_dir / "eval"}
    if all(p.is_dir() for p in out.values()):
        return out
    shutil.rmtree(data_dir, ignore_errors=True)
    for split, targets in (("train", (("pretrain", PRETRAIN_CLASSES), ("finetune", FINETUNE_CLASSES))),
                           ("val", (("eval", FINETUNE_CLASSES),))):
        full = write_digits_tree(data_dir / f"all-{split}", split=split)
        for name, classes in targets:
            out[name].mkdir(parents=True, exist_ok=True)
            for cls in classes:
                shutil.copytree(full / cls, out[name] / cls)
        shutil.rmtree(full)
    return out


def demo_config(settings: DemoSettings, trees: dict[str, Path]):
    from pipeline.flows import PipelineConfig

    root = f"s3://{BUCKET}"
    data = {name: {"source": str(path.resolve()), "url": f"{root}/datasets/digits-{name}", "name": f"digits-{name}",
                   "shard_size": settings.shard_size} for name, path in trees.items()}
    return PipelineConfig.model_validate({
        "root": root,
        "pretrain_data": data["pretrain"],
        "finetune_data": data["finetune"],
        "eval_data": data["eval"],
        "pretrain": {"preset": "digits_tiny_aug", "steps": settings.pretrain_steps, "nproc_per_node": settings.nproc,
                     "stall_timeout": 300, "retries": 1},
        "finetune": {"preset": "digits_tiny_ft", "steps": settings.finetune_steps, "nproc_per_node": settings.nproc,
                     "stall_timeout": 300, "retries": 1},
        "evaluate": {"batch_size": 128},
        "task_runner": {"kind": settings.task_runner, "workers": 2},
    })


# ----------------------------------------------------------------------------- the demo


def vitpipe_command() -> str:
    """How to call `vitpipe` from here: the venv's script (what `make demo` ran), relative when possible."""
    script = Path(sys.executable).parent / "vitpipe"
    if not script.exists():
        return "vitpipe"
    try:
        return os.path.relpath(script) if not os.path.relpath(script).startswith("..") else str(script)
    except ValueError:
        return str(script)


def retrieval_commands(result: dict, *, root: str, workdir: str) -> list[str]:
    cmd = f"env $(cat {env_file(workdir)}) {vitpipe_command()}"
    return [
        f"{cmd} artifacts ls {root}",
        f"{cmd} artifacts get latest:finetune ./demo-model --root {root} --file model.safetensors",
        f"{cmd} artifacts get {result['runs']['evaluate']} ./demo-eval --root {root}",
        f"{cmd} artifacts get {result['urls']['pretrain']} ./demo-pretrain",
    ]


def run_demo(settings: DemoSettings) -> dict:
    t0 = time.monotonic()
    workdir = Path(settings.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = ensure_store(workdir)
    os.environ.update(env)  # entry point: Prefect, Dask workers and DeepSpeed ranks inherit these
    storage.reset_clients()

    say("writing scikit-learn digits as class-folder trees (pretrain: 0-4; fine-tune/eval: 5-9) ...")
    trees = write_trees(workdir / "data")
    config = demo_config(settings, trees)
    say(f"running the Prefect flow vit_pipeline (local ephemeral API; runs under {config.root}/runs/) ...")
    from pipeline.flows import prefect_api, vit_pipeline

    with prefect_api() as api:
        say(f"Prefect API {api}")
        result = vit_pipeline(config)
    result["elapsed_s"] = round(time.monotonic() - t0, 1)

    top1 = result["top1"]
    print("", flush=True)
    say(f"done in {result['elapsed_s']:.0f} s")
    print(f"top-1 accuracy on held-out digits 5-9 (fine-tuned from a 0-4 pretraining): {top1:.4f}")
    for kind, run_id in result["runs"].items():
        reused = "  (inputs unchanged: reused)" if result["skipped"].get(kind) else ""
        print(f"  {kind:9s} run {run_id}  {result['urls'][kind]}{reused}")
    if result["urls"].get("report"):
        print(f"  report        {result['urls']['report']}")
    stop = f"{vitpipe_command()} demo --stop" + (f" --workdir {settings.workdir}" if settings.workdir != DemoSettings.workdir else "")
    print(f"retrieve the artifacts (the object store keeps running; `{stop}` stops it):")
    for cmd in retrieval_commands(result, root=config.root, workdir=settings.workdir):
        print(f"  {cmd}")
    line = {"top1": top1, "runs": result["runs"], "urls": result["urls"], "elapsed_s": result["elapsed_s"]}
    print(json.dumps(line), flush=True)
    return result


def main(settings: DemoSettings) -> int:
    try:
        run_demo(settings)
    except KeyboardInterrupt:
        print("vitpipe demo: interrupted", file=sys.stderr)
        return 130
    return 0
