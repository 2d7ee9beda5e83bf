"""Training speed of vit.VisionTransformer vs timm's VisionTransformer (same config), side by side.

One command: ``.venv/bin/python benchmarks/model_step.py``. For ViT-S/16 and ViT-Ti/16 at 224,
fp32, batch 16, a full AdamW step (forward, cross-entropy, backward, step). The two models'
steps alternate so machine noise hits both alike; medians after warm-up. Also measures fp32
GEMM throughput (2048^3) and reports CPU MFU = 3 * flops_per_image * img/s / GEMM FLOP/s.
Prints a markdown table. Targets: ratio >= 1.0 and MFU >= 0.75 for ViT-S/16.

``--compile`` adds a third contestant, our model after ``model.compile()`` (what ``model.compile: true``
does in vit.train through DeepSpeed's ``engine.compile()``), in the same interleaved rounds, and reports
its speed-up over our eager step and over timm's; compile time is left out (warm-up steps).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import vit  # noqa: E402
from vit.interop import timm_kwargs  # noqa: E402


def gemm_flops(n: int = 2048, reps: int = 3) -> list[float]:
    """fp32 GEMM FLOP/s samples (n^3, multiply-add = 2)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        out.append(2 * n**3 / (time.perf_counter() - t))
    return out


def make_step(model: torch.nn.Module, batch: int, img: int, classes: int):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    x = torch.randn(batch, 3, img, img)
    y = torch.randint(0, classes, (batch,))
    model.train()

    def step() -> float:
        t = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    return step


def bench(name: str, *, batch: int, img: int, warmup: int, steps: int, gemm: list[float],
          compiled: bool = False) -> dict:
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    torch.manual_seed(0)
    ours = vit.create_model(name, num_classes=1000, img_size=img)
    theirs = TimmViT(**timm_kwargs(ours.cfg))
    theirs.load_state_dict(vit.to_timm_state_dict(ours))
    steps_by = {"ours": make_step(ours, batch, img, 1000), "timm": make_step(theirs, batch, img, 1000)}
    if compiled:
        fast = vit.create_model(name, num_classes=1000, img_size=img)
        fast.load_state_dict(ours.state_dict())
        fast.compile()
        steps_by["compiled"] = make_step(fast, batch, img, 1000)
    for _ in range(warmup):
        for s in steps_by.values():
            s()
    times: dict[str, list[float]] = {k: [] for k in steps_by}
    order = list(steps_by)
    for i in range(steps):  # rotate the order too; sample GEMM peak in between (shared machine)
        gemm.extend(gemm_flops(reps=1))
        for k in order[i % len(order):] + order[:i % len(order)]:
            times[k].append(steps_by[k]())
    print(f"{name}: " + ", ".join(f"{k} {[round(t, 2) for t in v]}" for k, v in times.items()) + " s per step",
          file=sys.stderr)
    return dict(name=name, flops=ours.flops_per_image(), **{k: batch / statistics.median(v) for k, v in times.items()})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vit_small_patch16", "vit_tiny_patch16"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--compile", action="store_true", help="also time our model after model.compile()")
    args = ap.parse_args(argv)

    samples = gemm_flops()
    rows = [bench(n, batch=args.batch, img=args.img, warmup=args.warmup, steps=args.steps, gemm=samples,
                  compiled=args.compile) for n in args.models]
    gemm = statistics.median(samples)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.img}px, fp32, AdamW; medians of {args.steps} steps after {args.warmup} warm-up")
    print(f"fp32 GEMM 2048^3: {gemm / 1e9:.1f} GFLOP/s (median of {len(samples)}, sampled between steps); "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| model | ours img/s | timm img/s | ratio ours/timm | GFLOP/img (fwd) | ours train GFLOP/s | MFU ours | MFU timm |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        f3 = 3 * r["flops"]
        print(f"| {r['name']} | {r['ours']:.2f} | {r['timm']:.2f} | {r['ours'] / r['timm']:.3f} | "
              f"{r['flops'] / 1e9:.2f} | {f3 * r['ours'] / 1e9:.1f} | {f3 * r['ours'] / gemm:.2f} | "
              f"{f3 * r['timm'] / gemm:.2f} |")
    if args.compile:
        print("\n| model | compiled img/s | compiled / eager (ours) | compiled / timm | MFU compiled |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['name']} | {r['compiled']:.2f} | {r['compiled'] / r['ours']:.3f} | "
                  f"{r['compiled'] / r['timm']:.3f} | {3 * r['flops'] * r['compiled'] / gemm:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
