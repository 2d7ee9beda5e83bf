"""Training-engine and input-pipeline overheads, measured side by side in one run.

    .venv/bin/python benchmarks/train_step.py [--steps N] [--images N] [--rounds N] [--only engine|pipeline|projection]

1. DeepSpeed engine step (ZeRO-0 and ZeRO-1, fp32, CPU, world 1) vs a plain PyTorch loop on the
   same model, batch and optimizer (AdamW + clip 1.0): median step time, overhead (target <= 10%).
2. SMOKE TEST ONLY (digits cost almost nothing to decode; the input pipeline's figures come from
   benchmarks/input_pipeline.py, on real photographs, per core): vit.data.TrainStream images/s vs a
   bare loop (read tar, PIL decode, resize, to tensor) over the digits shards, from a local folder
   and from S3 (SeaweedFS started here): that both paths run end to end, local and S3. The
   loops run interleaved, one after the other in each of ``--rounds`` rounds; medians. A second
   bare loop reads the tars with shards.format's lean reader instead of ``tarfile``: the gap
   between the two bare loops is what the tar parsing costs, and TrainStream against the lean
   one is what the pipeline's own bookkeeping (lanes, shuffle window, labels, seeding) costs.
3. GPU projection (not a measurement): FLOPs/image x 3 / (A100 bf16 312 TFLOP/s x assumed MFU).
"""
from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shards import storage  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(img: int):
    import vit

    torch.manual_seed(0)
    return vit.create_model("vit_tiny_patch16", num_classes=100, img_size=img)


def bench_engine(*, batch: int, img: int, steps: int) -> list[tuple[str, float]]:
    """Median seconds per step: plain PyTorch vs DeepSpeed engine (ZeRO 0 / 1), interleaved in rounds."""
    import deepspeed

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")
    x, y = torch.randn(batch, 3, img, img), torch.randint(0, 100, (batch,))

    plain = _model(img)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=1e-4, weight_decay=0.1)

    def plain_step():
        loss = torch.nn.functional.cross_entropy(plain(x), y)
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        plain_opt.step()

    engines = {}
    for stage in (0, 1):
        m = _model(img)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.1)
        cfg = {"train_batch_size": batch, "train_micro_batch_size_per_gpu": batch, "gradient_clipping": 1.0,
               "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
        engines[stage] = deepspeed.initialize(model=m, optimizer=opt, config=cfg)[0]

    def ds_step(engine):
        def step():
            loss = torch.nn.functional.cross_entropy(engine(x), y)
            engine.backward(loss)
            engine.step()
        return step

    fns = {"plain PyTorch": plain_step, "DeepSpeed ZeRO-0": ds_step(engines[0]), "DeepSpeed ZeRO-1": ds_step(engines[1])}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(steps):  # interleave so machine noise hits all three alike
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return [(k, statistics.median(v)) for k, v in times.items()]


def _tar_members(f, *, lean: bool):
    """``(name, read)`` of each member: the stdlib's tarfile, or shards.format's lean reader (``lean``)."""
    if lean:
        from shards.format import TarMembers

        members = TarMembers(f)
        for name, _ in members:
            yield name, members.read
    else:
        with tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                yield member.name, tar.extractfile(member).read


def bare_decode(dataset: str, *, img: int, limit: int, lean: bool = False) -> float:
    """Images/s of the simplest reader: tar members -> PIL decode -> resize -> float tensor in [0, 1].

    Resizes with the filter TrainStream uses (bilinear; PIL's default for ``resize`` is bicubic,
    which is slower): both loops then do the same work per pixel.
    """
    from shards.reader import load_manifest, open_shard

    n, t = 0, time.perf_counter()
    for entry in load_manifest(dataset)["shards"]:
        with open_shard(storage.join(dataset, entry["name"])) as f:
            for name, read in _tar_members(f, lean=lean):
                ext = name.rsplit(".", 1)[-1]
                if ext not in ("jpg", "jpeg", "png", "webp"):
                    continue
                im = Image.open(io.BytesIO(read())).convert("RGB").resize((img, img), Image.BILINEAR)
                torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div_(255)
                n += 1
                if n >= limit:
                    return n / (time.perf_counter() - t)
    return n / (time.perf_counter() - t)


def stream_rate(dataset: str, *, img: int, limit: int, workers: int, augment: str = "pretrain") -> float:
    from vit.data import TrainStream

    s = TrainStream(dataset, img_size=img, global_batch_size=64, rank=0, world_size=1, num_workers=workers, lanes=4,
                    augment=augment)
    n, t = 0, time.perf_counter()
    epoch = 0
    while n < limit:
        for b in s.batches(epoch):
            n += len(b.keys)
            if n >= limit:
                break
        epoch += 1
    return n / (time.perf_counter() - t)


def projection() -> list[tuple[str, float, float]]:
    import vit

    rows = []
    for name in ("vit_base_patch16", "vit_large_patch16", "vit_huge_patch14"):
        m = vit.create_model(name, num_classes=21843, img_size=224, representation_size=None)
        f = m.flops_per_image()
        rows.append((name, f / 1e9, 312e12 * 0.4 / (3 * f)))
        del m
    return rows


def section_engine(*, steps: int) -> None:
    print("## 1. engine step: DeepSpeed vs plain PyTorch (ViT-Ti/16, 224 px, batch 8, fp32 CPU, AdamW, clip 1.0)")
    res = bench_engine(batch=8, img=224, steps=steps)
    base = res[0][1]
    print("| loop | median s/step | overhead |\n|---|---|---|")
    for name, t in res:
        print(f"| {name} | {t:.3f} | {100 * (t / base - 1):+.1f}% |")


def section_pipeline(*, limit: int, rounds: int) -> None:
    print("\n## 2. input pipeline SMOKE TEST (digits tree at 96 px, output 64 px; the figures: benchmarks/input_pipeline.py)")
    from pipeline.objectstore import start_seaweedfs
    from shards import shard_dataset
    from shards.digits import write_digits_tree

    with tempfile.TemporaryDirectory() as tmp:
        tree = write_digits_tree(Path(tmp) / "tree", size=96)
        local = str(Path(tmp) / "shards")
        shard_dataset(str(tree), local, name="digits", shard_size=200, seed=0)
        keys = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}
        store = start_seaweedfs(Path(tmp) / "weed", access_key=keys["AWS_ACCESS_KEY_ID"],
                                secret_key=keys["AWS_SECRET_ACCESS_KEY"], buckets=("bench",))
        try:
            os.environ.update(keys, AWS_ENDPOINT_URL=store.endpoint)
            storage.reset_clients()
            remote = "s3://bench/digits"
            storage.copy_tree(local, remote)
            print(f"{limit} images per run, {rounds} interleaved rounds, medians (img/s); ratios against the bare tarfile"
                  " loop (the target), in brackets against the bare loop with the lean tar reader\n")
            print("| source | bare (tarfile) | bare (lean tar) | TrainStream none | ratio | TrainStream pretrain | ratio |"
                  " TrainStream pretrain, 2 workers | ratio |")
            print("|---|---|---|---|---|---|---|---|---|")
            for label, url in (("local", local), ("S3 (SeaweedFS)", remote)):
                loops = {
                    "bare": lambda url=url: bare_decode(url, img=64, limit=limit),
                    "lean": lambda url=url: bare_decode(url, img=64, limit=limit, lean=True),
                    "none": lambda url=url: stream_rate(url, img=64, limit=limit, workers=0, augment="none"),
                    "pretrain": lambda url=url: stream_rate(url, img=64, limit=limit, workers=0),
                    "workers": lambda url=url: stream_rate(url, img=64, limit=limit, workers=2),
                }
                for fn in loops.values():  # warm-up: imports, page cache, S3 connections
                    fn()
                runs: dict[str, list[float]] = {k: [] for k in loops}
                for _ in range(rounds):  # interleaved so machine noise hits every loop alike
                    for key, fn in loops.items():
                        runs[key].append(fn())
                m = {k: statistics.median(v) for k, v in runs.items()}

                def cell(key: str) -> str:
                    return f"{m[key]:.0f} | {m[key] / m['bare']:.2f}x ({m[key] / m['lean']:.2f}x)"

                print(f"| {label} | {m['bare']:.0f} | {m['lean']:.0f} | {cell('none')} | {cell('pretrain')} |"
                      f" {cell('workers')} |")
        finally:
            store.stop()


def section_projection() -> None:
    print("\n## 3. GPU projection (NOT measured): img/s per A100 = 312e12 x MFU 0.4 / (3 x FLOPs/img), bf16, 224 px")
    print("| model | fwd GFLOPs/img | projected img/s per A100 | projected days for I21k 90 ep on 64 A100 |")
    print("|---|---|---|---|")
    for name, gf, ips in projection():
        days = 90 * 14_197_122 / (ips * 64) / 86400
        print(f"| {name} | {gf:.1f} | {ips:.0f} | {days:.1f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="timed engine steps per loop")
    # one epoch of the benchmark's digits stream (28 steps of 64), so TrainStream reads what it emits, as over a
    # real epoch. With 600 images (10 steps, ~0.3 s) it read ~3x what it emitted: the shuffle window (1000) is
    # longer than a lane (448 samples), so the first samples of a lane come from all over it and the whole lane is
    # read up front (plus the shard heads lanes skip, and per-run set-up: manifest, worker start, S3 clients)
    ap.add_argument("--images", type=int, default=1792, help="images per input-pipeline measurement")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the input-pipeline loops")
    ap.add_argument("--only", choices=("engine", "pipeline", "projection"), help="run one section")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one thread: on a shared 2-core machine 2 OpenMP threads mostly measure contention
    if args.only in (None, "engine"):
        section_engine(steps=args.steps)
    if args.only in (None, "pipeline"):
        section_pipeline(limit=args.images, rounds=args.rounds)
    if args.only in (None, "projection"):
        section_projection()
    return 0


if __name__ == "__main__":
    sys.exit(main())
