"""The training input pipeline per core, on real photographs: vit.data.TrainStream vs a bare loop.

    .venv/bin/python benchmarks/input_pipeline.py [--images 2048] [--rounds 5] [--core 0] [--workdir DIR] [--fresh]

The corpus is benchmarks/shard_throughput.py's (crops of scikit-image's photographs, 500x375 JPEGs,
each file distinct), sharded with the project's own sharder twice: pre-resized (`--resize 224`,
shorter side 224) and pass-through. Four cases, output 224x224 uint8: {224, pass-through} shards x
{pretraining augmentation (inception crop + flip), none (resize + centre crop)}.

Contestants, all pinned to one core (`--core`, as `taskset -c 0`):
* bare loop: stdlib `tarfile` read of each member, PIL decode (with `draft` when the crop allows, as
  TrainStream does), the same crop box / flip / bilinear resize, `np.stack` of 64 into a uint8 batch
  tensor; one Generator;
* TrainStream in-process (num_workers=0): everything in one process;
* TrainStream with 1 worker on the same core: the worker decodes, the rank hands the batch over.
Each TrainStream contestant is one stream reading epoch after epoch, as `vit.train` does (the warm-up
reads epoch 0, round r epoch r + 1): its worker is forked once and kept across epochs. `--fresh` makes a
new stream every round instead (the first epoch of a run: a worker forked, its shared buffers first used).
Every contestant's consumer reads every byte of each batch (`consume`), so a batch that reaches it in
memory not yet mapped in its process pays for that there.
Target: TrainStream >= 0.9x the bare loop. Runs are interleaved (every contestant of every case, then
the next round) and the medians reported. Rates are images per CPU-second (user + system time of
this process, its reaped DataLoader workers and its live ones: a kept worker's CPU, read from
/proc/PID/stat, is charged to its own contestant's next round, so the chunks it decodes ahead of the
next epoch while other contestants run are counted), the figure that says what a core decodes; on a
shared machine wall time also measures the other processes, so it is printed beside it (ratios of
wall-clock medians) and the load average with it. (A kept worker's read-ahead runs during the next
contestant's round: that one's wall time includes it.)
"""
from __future__ import annotations

import argparse
import io
import math
import multiprocessing
import os
import shutil
import sys
import tarfile
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from shard_throughput import _make_corpus  # noqa: E402

from shards import shard_dataset  # noqa: E402
from vit.augment import build_transform  # noqa: E402

SIZE = 224
BATCH, LANES = 64, 4


def bare_loop(dataset: Path, *, augment: str) -> Iterator[torch.Tensor]:
    """Batches of ``BATCH``: tar members -> PIL (draft) -> crop/flip/resize -> ``np.stack`` -> uint8 tensor
    [B, 3, S, S] (channels-last, as TrainStream's), one Generator."""
    transform = build_transform(augment, img_size=SIZE)  # only its box sampling: .params(width, height, rng)
    rng = np.random.default_rng(0)
    images = []
    for tar_path in sorted(dataset.glob("*.tar")):
        with open(tar_path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                if not member.name.endswith(".jpg"):
                    continue
                img = Image.open(io.BytesIO(tar.extractfile(member).read()))
                box, flip = transform.params(*img.size, rng)
                full_w, full_h = img.size
                img.draft("RGB", (math.ceil(full_w * SIZE / (box[2] - box[0])), math.ceil(full_h * SIZE / (box[3] - box[1]))))
                rx, ry = img.size[0] / full_w, img.size[1] / full_h
                out = img.resize((SIZE, SIZE), Image.BILINEAR, box=(box[0] * rx, box[1] * ry, box[2] * rx, box[3] * ry))
                if flip:
                    out = out.transpose(Image.FLIP_LEFT_RIGHT)
                images.append(np.asarray(out))
                if len(images) == BATCH:
                    yield torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
                    images = []
    if images:
        yield torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


def train_stream(dataset: Path, *, augment: str, workers: int):
    from vit.data import TrainStream

    return TrainStream(str(dataset), img_size=SIZE, global_batch_size=BATCH, rank=0, world_size=1,
                       num_workers=workers, lanes=LANES, augment=augment, pin_memory=False)


class Epochs:
    """A TrainStream contestant: each call reads the next epoch of one stream (``fresh``: of a new stream)."""

    def __init__(self, dataset: Path, *, augment: str, workers: int, fresh: bool = False):
        self.make = lambda: train_stream(dataset, augment=augment, workers=workers)
        self.stream, self.epoch, self.fresh = None, 0, fresh

    def __call__(self) -> int:
        if self.fresh:
            return consume(batch.images for batch in self.make().batches(0))
        self.stream = self.stream or self.make()
        self.epoch += 1
        return consume(batch.images for batch in self.stream.batches(self.epoch - 1))


def consume(batches: Iterator[torch.Tensor]) -> int:
    """What every contestant's consumer does with a batch: reads every byte of it (``amax``, no temporary),
    so memory that reaches the consumer unmapped (fresh shared memory from a worker) costs its page faults
    here as it would in a training step's copy to the device. Returns the images read."""
    n = 0
    for images in batches:
        images.amax()
        n += len(images)
    return n


def _cpu_seconds() -> float:
    """This process and its reaped children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _live_cpu_seconds(pid: int) -> float:
    """A live child's user + system time (clock ticks, as ``os.times``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Charges:
    """CPU seconds per contestant: this process and reaped children while it runs, plus what each of its
    live workers (a child first seen alive after its round) used since it was last charged."""

    def __init__(self):
        self.owner, self.charged = {}, {}  # pid -> contestant, CPU seconds already charged

    def take(self, name: str, before: float) -> float:
        used = _cpu_seconds() - before
        live = {p.pid for p in multiprocessing.active_children()}
        for pid in set(self.owner) - live:  # reaped: os.times counted its whole life, some of it charged before
            used -= self.charged.pop(pid)
            del self.owner[pid]
        for pid in live:
            self.owner.setdefault(pid, name)
            if self.owner[pid] == name:
                now = _live_cpu_seconds(pid)
                used += now - self.charged.get(pid, 0.0)
                self.charged[pid] = now
        return used


def _interleaved(runs: dict, rounds: int) -> dict:
    """{name: (median images per CPU-second, median images per wall second)}; runs return images done and
    are interleaved (A B C A B C ...) so that load from other processes hits every contestant alike."""
    cpu, wall = {k: [] for k in runs}, {k: [] for k in runs}
    charges = _Charges()
    for name, fn in runs.items():  # warm-up: imports, page cache; a kept worker's CPU so far
        c = _cpu_seconds()
        fn()
        charges.take(name, c)
    for _ in range(rounds):
        for name, fn in runs.items():
            c, w = _cpu_seconds(), time.perf_counter()
            n = fn()
            wall[name].append(n / (time.perf_counter() - w))
            cpu[name].append(n / charges.take(name, c))
    return {k: (statistics.median(cpu[k]), statistics.median(wall[k])) for k in runs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2048, help="corpus size (default 2048 distinct photos)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--core", type=int, default=0, help="the one core every contestant runs on")
    ap.add_argument("--workdir", default=None, help="keep corpus and shards here (re-used when present)")
    ap.add_argument("--fresh", action="store_true", help="a new TrainStream every round (the first epoch of a run)")
    args = ap.parse_args(argv)
    os.sched_setaffinity(0, {args.core})  # workers forked later inherit it
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="input-bench-"))
    try:
        corpus = work / "corpus"
        _make_corpus(corpus, count=args.images, size="500x375", classes=20)
        shards = {"224": work / "shards-224", "pass-through": work / "shards-full"}
        for kind, out in shards.items():
            if not (out / "manifest.json").exists():
                shard_dataset(str(corpus), str(out), name=kind, shard_size=max(1, args.images // 16), seed=0,
                              **({"resize": SIZE} if kind == "224" else {}))
        runs = {}
        for kind, url in shards.items():
            for augment in ("pretrain", "none"):
                runs[(kind, augment, "bare")] = lambda url=url, a=augment: consume(bare_loop(url, augment=a))
                for w in (0, 1):
                    runs[(kind, augment, f"w{w}")] = Epochs(url, augment=augment, workers=w, fresh=args.fresh)
        load0 = os.getloadavg()[0]
        rate = _interleaved(runs, args.rounds)
        print(f"\n{args.images} photos (500x375 JPEG), output {SIZE}x{SIZE} uint8, core {args.core} only, "
              f"{args.rounds} interleaved rounds, medians; load average {load0:.1f} at the start, "
              f"{os.getloadavg()[0]:.1f} at the end; TrainStream: "
              + ("a new stream every round (first epochs)" if args.fresh else f"one stream, epochs 1 to {args.rounds}"))
        print("images per CPU-second (ratio to the bare loop; in brackets the ratio of wall-clock medians)\n")
        print("| shards | augmentation | bare loop | TrainStream in-process | ratio | TrainStream, 1 worker | ratio |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for kind in shards:
            for augment in ("pretrain", "none"):
                (bare, bare_wall), *streams = (rate[(kind, augment, c)] for c in ("bare", "w0", "w1"))
                cells = " | ".join(f"{cpu:.0f} | **{cpu / bare:.2f}x** ({wall / bare_wall:.2f}x)" for cpu, wall in streams)
                print(f"| {kind} | {augment} | {bare:.0f} | {cells} |")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
