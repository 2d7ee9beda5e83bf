"""PROJECTIONS, not measurements: what one ViT training step costs on a GPU, from arithmetic.

No GPU is lent here, so every figure below is derived, and says from what:

* FLOPs per training image = 3 x forward FLOPs (backward = 2 x forward), plus one more forward of
  every block with per-block activation checkpointing (the recompute). Forward FLOPs are
  `ViTConfig.flops_per_image` (tests check both against torch's FlopCounterMode).
* img/s per GPU = peak x MFU / FLOPs per image. The MFU is an assumption: DEFAULT_MFU is the
  issue's goal, 3,000 img/s for ViT-B/16 at 224 px, = 3,000 x 105.6 GFLOP / 989.4 TFLOP/s = 32 %.
* Bytes per rank: weights, gradients and optimizer state under ZeRO 0-3 (DeepSpeed's partitioning
  of torch's optimizer, bf16 autocast = fp32 weights), and the activations one micro-batch saves for
  backward (derived per tensor below; tests count them with saved_tensors_hooks on CPU).
* Decode: a rank's input rate = its decode workers x a per-core rate (measured on CPU here).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import vit
from vit.model import model_config

H100_BF16_PEAK = 989.4e12  # H100 SXM dense bf16 FLOP/s (NVIDIA datasheet: 1,979 T with 2:4 sparsity)
H100_MEMORY = 80e9  # bytes of HBM3
USABLE_MEMORY_SHARE = 0.9  # headroom for the CUDA context, allocator fragmentation, NCCL buffers
DEFAULT_MFU = 3000 * 105.6e9 / H100_BF16_PEAK  # the goal for ViT-B/16 at 224 px: 0.320
DECODE_PER_CORE = 750.0  # img/s per core with a DataLoader worker, 224 px pre-resized shards, pretraining augmentation
# (issue 18: 772-816 img per CPU-second in three runs of benchmarks/input_pipeline.py, load 4-9; rounded down)
OPTIMIZER_STATE = {"adamw": 8, "sgd": 4}  # bytes per parameter: Adam m and v / SGD momentum, fp32
ZERO_STAGES = (0, 1, 2, 3)


def vit_config(model_cfg, *, num_classes: int) -> vit.ViTConfig:
    """The architecture a run config's `model` section builds (arithmetic only: no weights)."""
    return model_config(model_cfg.name, num_classes=num_classes, img_size=model_cfg.img_size, **model_cfg.overrides)


def meta_model(model_cfg, *, num_classes: int) -> vit.VisionTransformer:
    """The model a run config's `model` section builds, on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return vit.create_model(model_cfg.name, num_classes=num_classes, img_size=model_cfg.img_size,
                                **model_cfg.overrides)


def train_flops_per_image(cfg: vit.ViTConfig, *, grad_checkpointing: bool = False) -> int:
    """Forward + backward FLOPs of one image; checkpointing adds one forward of every block."""
    extra = cfg.depth * cfg.flops_per_block() if grad_checkpointing else 0
    return 3 * cfg.flops_per_image() + extra


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_bytes(n_params: int, *, zero_stage: int, world_size: int, optimizer: str = "adamw") -> dict[str, float]:
    """Per rank: fp32 weights, fp32 gradients and optimizer state under ZeRO `zero_stage` at `world_size`.

    Stage 0: torch's optimizer on the model's own fp32 tensors. Stages 1-3: DeepSpeed's ZeRO optimizer
    keeps an fp32 copy of this rank's partition next to the optimizer state (4 more bytes per parameter,
    partitioned); stage 2 also partitions gradients, stage 3 also the weights.
    """
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage={zero_stage} is not one of {list(ZERO_STAGES)}")
    state = OPTIMIZER_STATE[optimizer] + (4 if zero_stage else 0)
    share = lambda partitioned: n_params / (world_size if partitioned else 1)  # noqa: E731
    return {"params": 4 * share(zero_stage >= 3), "grads": 4 * share(zero_stage >= 2),
            "optimizer": state * share(zero_stage >= 1)}


def block_activation_bytes_per_token(cfg: vit.ViTConfig, *, precision: str = "bf16") -> int:
    """Bytes one block saves for backward per token (memory-efficient / flash SDPA: no N x N matrix).

    The residual stream stays fp32 under autocast: the inputs of both LayerNorms (2 x 4D) and their
    mean / rstd (2 x 2 x 4). In the activation dtype (2 bytes bf16, 4 fp32): the qkv input (D), q k v
    (3D), the attention output = proj input (D), the fc1 input (D), the GELU input and output (2 x mlp);
    plus the attention's log-sum-exp (4 bytes per head).
    """
    a = 2 if precision == "bf16" else 4
    d = cfg.embed_dim
    return 2 * 4 * d + 16 + a * (6 * d + 2 * cfg.mlp_dim) + 4 * cfg.num_heads


def activation_bytes(model: vit.VisionTransformer, micro_batch: int, *, grad_checkpointing: bool = False,
                     precision: str = "bf16") -> dict[str, float]:
    """Bytes saved for backward by one micro-batch: `saved` after the forward, `peak` during backward.

    Without checkpointing every block keeps `block_activation_bytes_per_token`; with it, a block keeps
    only its fp32 input and recomputes the rest in backward, so the peak adds one block's activations.
    Outside the blocks: the image (in the activation dtype), the final LayerNorm's fp32 input and
    statistics, and what the head keeps of its output: in fp32 the whole [N, D] output (the pooled
    token is a view of it), in bf16 the cast pooled token only. Under bf16 autocast, the bf16 copies of the weights the forward used (2 bytes per
    parameter; with checkpointing one block's copies at a time).
    """
    cfg = model.cfg
    a = 2 if precision == "bf16" else 4
    t = cfg.grid[0] * cfg.grid[1] + cfg.num_prefix_tokens
    per_block = block_activation_bytes_per_token(cfg, precision=precision) * t
    outside = a * cfg.in_chans * cfg.img_size[0] * cfg.img_size[1] + (4 * cfg.embed_dim + 8) * t
    outside += 2 * cfg.embed_dim if precision == "bf16" else 4 * cfg.embed_dim * t
    casts = 2 * param_count(model) if precision == "bf16" else 0
    block_casts = 2 * param_count(model.blocks[0]) if precision == "bf16" else 0
    if grad_checkpointing:
        saved = micro_batch * (cfg.depth * 4 * cfg.embed_dim * t + outside) + (casts - cfg.depth * block_casts)
        return {"saved": saved, "peak": saved + micro_batch * per_block + block_casts}
    saved = micro_batch * (cfg.depth * per_block + outside) + casts
    return {"saved": saved, "peak": saved}


def projected_images_per_sec(cfg: vit.ViTConfig, *, grad_checkpointing: bool = False,
                             mfu: float = DEFAULT_MFU, peak: float = H100_BF16_PEAK) -> float:
    """PROJECTION: training img/s of one GPU at `mfu` of its dense bf16 `peak`."""
    return peak * mfu / train_flops_per_image(cfg, grad_checkpointing=grad_checkpointing)


@dataclass(frozen=True)
class Fit:
    """The lowest-cost setting that fits a rank's memory: ZeRO stage, checkpointing, bytes."""

    zero_stage: int | None  # None: nothing fits at this micro-batch
    grad_checkpointing: bool
    bytes: float


def memory_per_rank(model: vit.VisionTransformer, *, micro_batch: int, zero_stage: int, world_size: int,
                    grad_checkpointing: bool, optimizer: str = "adamw", precision: str = "bf16") -> float:
    n = param_count(model)
    state = state_bytes(n, zero_stage=zero_stage, world_size=world_size, optimizer=optimizer)
    acts = activation_bytes(model, micro_batch, grad_checkpointing=grad_checkpointing, precision=precision)
    return sum(state.values()) + acts["peak"]


def fit_memory(model: vit.VisionTransformer, *, micro_batch: int, world_size: int, optimizer: str = "adamw",
               memory: float = H100_MEMORY * USABLE_MEMORY_SHARE) -> Fit:
    """The first setting that fits in `memory`, tried without checkpointing (no recompute) at ZeRO 0, 1, 2, 3,
    then with it. ZeRO-1 costs no more communication than plain data parallel; checkpointing costs 1/3
    more FLOPs (`train_flops_per_image`), ZeRO-3 half again the communication."""
    last = 0.0
    for ckpt in (False, True):
        for stage in ZERO_STAGES:
            last = memory_per_rank(model, micro_batch=micro_batch, zero_stage=stage, world_size=world_size,
                                   grad_checkpointing=ckpt, optimizer=optimizer)
            if last <= memory:
                return Fit(stage, ckpt, last)
    return Fit(None, True, last)


def max_micro_batch(model: vit.VisionTransformer, *, zero_stage: int, world_size: int, grad_checkpointing: bool,
                    optimizer: str = "adamw", memory: float = H100_MEMORY * USABLE_MEMORY_SHARE) -> int:
    """The largest micro-batch that fits in `memory` (bytes per rank are linear in the micro-batch)."""
    kw = dict(zero_stage=zero_stage, world_size=world_size, grad_checkpointing=grad_checkpointing, optimizer=optimizer)
    fixed = memory_per_rank(model, micro_batch=0, **kw)
    per_image = memory_per_rank(model, micro_batch=1, **kw) - fixed
    return max(0, int((memory - fixed) // per_image))


def decode_warning(run_cfg, *, per_core: float = DECODE_PER_CORE, mfu: float = DEFAULT_MFU,
                   peak: float = H100_BF16_PEAK, num_classes: int = 1000) -> str | None:
    """One line when a rank's projected decode rate (data.num_workers x `per_core` img/s) is below the
    projected GPU step rate of this config's model on an H100 at `mfu`; None when decode keeps up."""
    cfg = vit_config(run_cfg.model, num_classes=num_classes)
    gpu = projected_images_per_sec(cfg, grad_checkpointing=run_cfg.model.grad_checkpointing, mfu=mfu, peak=peak)
    workers = run_cfg.data.num_workers
    decode = workers * per_core
    if decode >= gpu:
        return None
    need = -(-gpu // per_core)
    return (f"warning: decode is projected below the GPU step rate: {workers} worker(s) per rank x {per_core:.0f} "
            f"img/s per core = {decode:.0f} img/s < {gpu:.0f} img/s per H100 ({cfg.name} at "
            f"{cfg.img_size[0]} px, {train_flops_per_image(cfg) / 1e9:.1f} GFLOP/img, MFU {mfu:.2f} "
            f"assumed); the GPUs would wait on input: give each rank {need:.0f} decode cores "
            f"(data.num_workers={need:.0f}) or decode on the GPU (projection, unverified on GPU)")
