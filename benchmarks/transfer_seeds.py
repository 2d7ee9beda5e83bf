"""The digits transfer experiments over seeds, through the real path (DeepSpeed launches via the CLI).

    .venv/bin/python benchmarks/transfer_seeds.py [--seeds 0,1,2,3,4] [--jobs N] [--out DIR] [--skip-parity]

Per seed s (``seed`` and ``data.seed`` = s), the recipe of tests/test_finetune.py:

1. ``vitpipe pretrain --preset digits_tiny_aug`` on digits 0-4 (train split) at 16 px, PT_STEPS steps, with
   the few-shot evaluator on (shots from 0-4 train, scored on 0-4 val);
2. ``vitpipe finetune --preset digits_tiny_ft`` on digits 5-9 at 32 px, FT_STEPS steps: top-1 on held-out 5-9;
3. from scratch: ``digits_tiny`` at 32 px on 5-9 for the same FT_STEPS steps and batch: top-1 on held-out 5-9;
4. 10-shot linear accuracy (``vitpipe evaluate RUN --fewshot``) of the pretraining, and of the same
   model with random weights (seed s), on 0-4 (the pretraining's classes, held-out images) and on
   5-9 (classes it never saw);
5. even/odd: ``digits_tiny_aug`` on all ten digits, fine-tuned (``digits_tiny_ft``) on parity at 32 px.

Prints one row per seed and mean / std / min of each column. Each launch takes 30-90 s on 2 cores
(a 400-step pretraining several minutes on a loaded machine); ``--jobs N`` runs N seeds side by side,
each rank on one thread.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vit.presets import get_preset  # noqa: E402

PT_PRESET, FT_PRESET, SCRATCH_PRESET = "digits_tiny_aug", "digits_tiny_ft", "digits_tiny"  # as tests/test_finetune.py
PT_STEPS = get_preset(PT_PRESET).schedule.total_steps
FT_STEPS = get_preset(FT_PRESET).schedule.total_steps
FEWSHOT_EVERY = 100


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vitpipe(*args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"vitpipe {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def make_sets(root: Path) -> dict[str, str]:
    from shards import shard_dataset
    from shards.digits import write_digits_tree

    sets = {}
    for name, split, digits, parity in [("a_train", "train", range(5), False), ("a_val", "val", range(5), False),
                                        ("b_train", "train", range(5, 10), False), ("b_val", "val", range(5, 10), False),
                                        ("all_train", "train", range(10), False),
                                        ("parity_train", "train", range(10), True), ("parity_val", "val", range(10), True)]:
        tree = write_digits_tree(root / "trees" / name, split=split, size=32, digits=digits, parity=parity)
        shard_dataset(str(tree), str(root / name), name=name, shard_size=100, seed=0)
        sets[name] = str(root / name)
    return sets


def random_weights_fewshot(run_url: str, train: str, val: str) -> float:
    import vit
    from vit.config import RunConfig
    from vit.fewshot import fewshot_eval

    cfg = RunConfig.from_dict(json.loads(Path(run_url, "config.json").read_text()))
    torch.manual_seed(cfg.seed)
    model = vit.create_model(cfg.model.name, num_classes=5, img_size=cfg.model.img_size, **cfg.model.overrides)
    return fewshot_eval(model, train, val, shots=[10])["fewshot_10shot"]


def one_seed(seed: int, sets: dict[str, str], out: str, *, parity: bool, threads: int | None = None) -> dict:
    seed_sets = [f"seed={seed}", f"data.seed={seed}"] + ([f"launch.cpu_threads_per_rank={threads}"] if threads else [])
    sets_args = [a for s in seed_sets for a in ("--set", s)]
    runs = os.path.join(out, "runs")
    pt_id, scratch_id = f"pretrain-20260101-000000-{seed:06x}", f"pretrain-20260101-000001-{seed:06x}"
    vitpipe("pretrain", "--preset", PT_PRESET, "--data", sets["a_train"], "--out", out, "--run-id", pt_id,
            "--steps", PT_STEPS, "--nproc", 1, "--master-port", free_port(), *sets_args,
            "--set", f"fewshot.every_steps={FEWSHOT_EVERY}", "--set", f"fewshot.data={sets['a_train']}",
            "--set", f"fewshot.val_data={sets['a_val']}", "--set", "fewshot.shots=[10]")
    ft = vitpipe("finetune", "--preset", FT_PRESET, "--pretrained", pt_id, "--data", sets["b_train"],
                 "--val-data", sets["b_val"], "--out", out, "--img-size", 32, "--steps", FT_STEPS, "--nproc", 1,
                 "--set", f"launch.master_port={free_port()}", *sets_args)
    vitpipe("pretrain", "--preset", SCRATCH_PRESET, "--data", sets["b_train"], "--out", out, "--run-id", scratch_id,
            "--steps", FT_STEPS, "--nproc", 1, "--set", "model.img_size=32", "--master-port", free_port(), *sets_args)
    scratch = vitpipe("evaluate", scratch_id, "--runs-root", out, "--data", sets["b_val"])
    row = {"seed": seed, "finetuned": ft["top1"], "scratch": scratch["top1"]}
    pt_url = os.path.join(runs, pt_id)
    for tag, train, val in (("0-4", "a_train", "a_val"), ("5-9", "b_train", "b_val")):
        fs = vitpipe("evaluate", pt_id, "--runs-root", out, "--fewshot", "10", "--data", sets[train], "--val-data", sets[val])
        row[f"10shot {tag}"] = fs["fewshot_10shot"]
        row[f"10shot {tag} random"] = random_weights_fewshot(pt_url, sets[train], sets[val])
    if parity:
        all_id = f"pretrain-20260101-000002-{seed:06x}"
        vitpipe("pretrain", "--preset", PT_PRESET, "--data", sets["all_train"], "--out", out, "--run-id", all_id,
                "--steps", PT_STEPS, "--nproc", 1, "--master-port", free_port(), *sets_args)
        eo = vitpipe("finetune", "--preset", FT_PRESET, "--pretrained", all_id, "--data", sets["parity_train"],
                     "--val-data", sets["parity_val"], "--out", out, "--img-size", 32, "--steps", FT_STEPS, "--nproc", 1,
                     "--set", f"launch.master_port={free_port()}", *sets_args)
        row["even/odd"] = eo["top1"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--skip-parity", action="store_true", help="leave out the even/odd experiment")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run side by side (each rank then on one thread)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="transfer-seeds-")
    sets = make_sets(Path(out) / "data")
    print(f"recipe: {PT_PRESET} {PT_STEPS} steps at 16 px, {FT_PRESET} / from scratch ({SCRATCH_PRESET}) "
          f"{FT_STEPS} steps at 32 px; "
          f"work folder {out}", flush=True)
    def run(seed: int) -> dict:
        row = one_seed(seed, sets, out, parity=not args.skip_parity, threads=1 if args.jobs > 1 else None)
        print(json.dumps(row), flush=True)
        return row

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # each seed is a chain of subprocesses
        rows = list(pool.map(run, (int(s) for s in args.seeds.split(","))))
    columns = [c for c in rows[0] if c != "seed"]
    print("\n| seed | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for row in rows:
        print(f"| {row['seed']} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    for name, fn in (("mean", statistics.mean), ("std", lambda v: statistics.stdev(v) if len(v) > 1 else 0.0),
                     ("min", min)):
        print(f"| {name} | " + " | ".join(f"{fn([r[c] for r in rows]):.3f}" for c in columns) + " |")
    gap = statistics.mean(r["finetuned"] - r["scratch"] for r in rows)
    print(f"\nfine-tuned - scratch, mean over seeds: {100 * gap:+.1f} points")


if __name__ == "__main__":
    main()
