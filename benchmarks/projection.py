"""PROJECTIONS (no GPU here): each paper preset on H100s, from vit.budget's arithmetic.

One command: ``.venv/bin/python benchmarks/projection.py [--per-core 550] [--mfu 0.32] [--world 8]``.

Per preset (and ViT-B/16, L/16, H/14 at 224 and ~384 px with the pretraining recipe): training
GFLOP per image, projected img/s per H100 at the assumed MFU, decode cores per H100 at the per-core
decode rate, and the ZeRO stage + activation-checkpointing setting that fits 80 GB (90 % usable) at the
preset's micro-batch on `--world` ranks, and at the whole per-rank batch in one micro-step. The
per-core rate defaults to issue 18's CPU measurement (224 px pre-resized shards, pretraining
augmentation); larger images decode slower, so the cores column is a lower bound above 224 px.
Nothing here is measured on a GPU.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cluster import fit_layout  # noqa: E402
from vit import budget  # noqa: E402
from vit.config import RunConfig, apply_overrides  # noqa: E402
from vit.presets import PRESETS, get_preset  # noqa: E402

CLASSES = {"i21k": 21843, "jft": 18291, "imagenet": 1000, "cifar10": 10, "cifar100": 100, "pets": 37}
# the pretraining recipes at the fine-tuning size (224 px rows are the presets themselves); 378 = 27 x 14
RESOLUTIONS = {"vit_base_patch16": 384, "vit_large_patch16": 384, "vit_huge_patch14": 378}


def rows(*, world: int) -> list[tuple[str, RunConfig, int]]:
    """(label, config fitted to `world` ranks, classes) for every paper preset, then the model x size grid."""
    out = []
    for name in PRESETS:
        if name.startswith("digits"):
            continue
        out.append((name, get_preset(name), CLASSES[name.split("_")[0]]))
    pre = {"vit_base_patch16": "i21k_vit_b16", "vit_large_patch16": "i21k_vit_l16", "vit_huge_patch14": "jft_vit_h14"}
    for model, px in RESOLUTIONS.items():
        out.append((f"{pre[model]} @ {px} px", apply_overrides(get_preset(pre[model]), [f"model.img_size={px}"]),
                    CLASSES[pre[model].split("_")[0]]))
    fitted = []
    for label, cfg, classes in out:
        data = apply_overrides(cfg, [f"launch.nproc_per_node={world}"]).to_dict()
        fit_layout(data)
        fitted.append((label, RunConfig.from_dict(data), classes))
    return fitted


def fit_text(fit: budget.Fit) -> str:
    if fit.zero_stage is None:
        return f"none ({fit.bytes / 1e9:.0f} GB)"
    return f"ZeRO-{fit.zero_stage}{', ckpt' if fit.grad_checkpointing else ''} ({fit.bytes / 1e9:.1f} GB)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-core", type=float, default=budget.DECODE_PER_CORE,
                    help="decode img/s per CPU core (default: issue 18's 224-px figure with augmentation)")
    ap.add_argument("--mfu", type=float, default=budget.DEFAULT_MFU, help="assumed MFU of the H100 dense bf16 peak")
    ap.add_argument("--world", type=int, default=8, help="ranks (H100s) the ZeRO stages partition over")
    args = ap.parse_args(argv)

    print(f"PROJECTIONS, not measurements: H100 SXM {budget.H100_BF16_PEAK / 1e12:.1f} TFLOP/s dense bf16 x MFU "
          f"{args.mfu:.3f} (assumed); decode {args.per_core:.0f} img/s per core (224 px, CPU, measured); "
          f"{args.world} ranks; 80 GB x {budget.USABLE_MEMORY_SHARE:.0%} usable; bf16 autocast (fp32 weights), "
          "flash / memory-efficient SDPA; fit = first of ZeRO 0-3 without, then with, per-block checkpointing\n")
    print("| preset | model | px | params | train GFLOP/img | img/s per H100 | decode cores per H100 | "
          "micro-batch: fits with | per-rank batch in one step: fits with | largest micro-batch, ZeRO-1: no ckpt / ckpt |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, cfg, classes in rows(world=args.world):
        model = budget.meta_model(cfg.model, num_classes=classes)
        ips = budget.projected_images_per_sec(model.cfg, mfu=args.mfu)
        micro, local = cfg.batch.micro_batch_size, cfg.batch.global_batch_size // args.world
        fits = [budget.fit_memory(model, micro_batch=b, world_size=args.world, optimizer=cfg.optim.name)
                for b in (micro, local)]
        ckpt_ips = (f" ({budget.projected_images_per_sec(model.cfg, mfu=args.mfu, grad_checkpointing=True):.0f} with ckpt)"
                    if fits[1].grad_checkpointing else "")
        largest = [budget.max_micro_batch(model, zero_stage=1, world_size=args.world, grad_checkpointing=c,
                                          optimizer=cfg.optim.name) for c in (False, True)]
        print(f"| {label} | {cfg.model.name} | {cfg.model.img_size} | {budget.param_count(model) / 1e6:.0f}M | "
              f"{budget.train_flops_per_image(model.cfg) / 1e9:.1f} | {ips:.0f}{ckpt_ips} | {ips / args.per_core:.1f}"
              f"{'+' if cfg.model.img_size > 224 else ''} | {micro}: {fit_text(fits[0])} | {local}: {fit_text(fits[1])} | {largest[0]} / {largest[1]} |")
    print("\n+ decode measured at 224 px only: larger images cost more per image, so more cores than shown")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
