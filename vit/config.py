"""Typed run configs: small sub-configs composed into one `RunConfig`.

Each part of the training loop receives only its slice (model, data, optim, schedule,
checkpoint, launch). Every config validates itself in `__post_init__` and says how to fix
what is wrong. `RunConfig.to_dict()` / `RunConfig.from_dict()` round-trip through JSON,
`apply_overrides(cfg, ["optim.lr=0.001", ...])` implements `--set key=value`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from shards.errors import VitpipeError


class ConfigError(VitpipeError, ValueError):
    """A run config that cannot work; the message says which field and how to fix it."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _choice(name: str, value: Any, allowed: tuple) -> None:
    _check(value in allowed, f"{name}={value!r} is not one of {list(allowed)}; set {name} to one of them")


@dataclass
class ModelConfig:
    """Which ViT to build (`vit.create_model(name, num_classes=..., img_size=..., **overrides)`)."""

    name: str = "vit_base_patch16"
    img_size: int = 224
    # architecture overrides passed to vit.create_model (patch_size, embed_dim, depth, num_heads,
    # mlp_ratio, representation_size, pool, drop_rate, ...)
    overrides: dict = field(default_factory=dict)
    # fine-tuning: how position embeddings are resampled to a new grid (vit.resample_pos_embed's mode):
    # timm's "bicubic", or "scipy_linear" = the official code's scipy.ndimage.zoom(order=1)
    posemb_resample: str = "bicubic"
    compile: bool = False  # torch.compile the model (vit.train); first steps pay the compile time
    grad_checkpointing: bool = False  # recompute each block in backward: activations ~1/D, ~1/3 more FLOPs

    @property
    def patch_size(self) -> int:
        if "patch_size" in self.overrides:
            return int(self.overrides["patch_size"])
        m = re.search(r"patch(\d+)", self.name)
        _check(m is not None, f"model.name={self.name!r} does not say its patch size; add model.overrides.patch_size")
        return int(m.group(1))

    def __post_init__(self) -> None:
        _check(self.img_size > 0, f"model.img_size={self.img_size} must be positive")
        _choice("model.posemb_resample", self.posemb_resample, ("bicubic", "scipy_linear"))
        for key in ("compile", "grad_checkpointing"):
            _check(isinstance(getattr(self, key), bool), f"model.{key}={getattr(self, key)!r} must be true or false")
        p = self.patch_size
        _check(
            self.img_size % p == 0,
            f"model.img_size={self.img_size} is not divisible by the patch size {p}; "
            f"use an img_size that is a multiple of {p} (e.g. {max(p, self.img_size // p * p)})",
        )


@dataclass
class DataConfig:
    """Where the training shards are and how the stream reads them (vit.data.TrainStream)."""

    url: str = ""
    seed: int = 0
    num_workers: int | None = 2  # None: derived from cores and ranks per node (pipeline.cluster.data_workers)
    lanes: int = 8  # 0: derived from the world size at launch (pipeline.cluster.fit_layout)
    augment: str = "pretrain"  # pretrain | finetune | crop | none (vit.augment.build_transform)
    label_mode: str = "auto"  # auto | softmax | sigmoid
    decode: str = "cpu"  # cpu | gpu (JPEGs decoded and cropped on the device, vit.data.gpu) | auto (gpu with CUDA)
    # the run fails when more than this share of the samples seen could not be read (each is replaced
    # by a neighbour, so a few are harmless; many mean a broken dataset: run `vitpipe verify`)
    max_corrupt_share: float = 0.001

    def __post_init__(self) -> None:
        _choice("data.augment", self.augment, ("pretrain", "finetune", "crop", "none"))
        _check(0 <= self.max_corrupt_share <= 1, f"data.max_corrupt_share={self.max_corrupt_share} must be in [0, 1]")
        _choice("data.label_mode", self.label_mode, ("auto", "softmax", "sigmoid"))
        _choice("data.decode", self.decode, ("cpu", "gpu", "auto"))
        _check(self.num_workers is None or self.num_workers >= 0,
               "data.num_workers must be >= 0 (or null: derived from the cores and ranks per node at launch)")
        _check(self.lanes >= 0, "data.lanes must be >= 1 (or 0: derived from the world size at launch)")


@dataclass
class OptimConfig:
    """Optimizer. Paper pretraining: AdamW(0.9, 0.999), wd 0.1 (JFT) / 0.03 (I21k); fine-tune: SGD m=0.9, no wd."""

    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)
    momentum: float = 0.9
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    fused: bool | None = None  # AdamW's fused kernel; None: on CUDA only (torch's default path elsewhere)

    def __post_init__(self) -> None:
        _choice("optim.name", self.name, ("adamw", "sgd"))
        _check(self.fused in (None, True, False), f"optim.fused={self.fused!r} must be true, false or null (on CUDA only)")
        self.betas = tuple(float(b) for b in self.betas)
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas must be two numbers in [0, 1)")
        _check(self.lr > 0, f"optim.lr={self.lr} must be > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay must be >= 0")
        _check(self.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 turns clipping off)")


@dataclass
class ScheduleConfig:
    """Steps and learning-rate schedule: linear warm-up, then linear or cosine decay to end_lr_factor*lr."""

    total_steps: int = 100_000
    warmup_steps: int = 10_000
    decay: str = "linear"  # linear | cosine
    end_lr_factor: float = 0.0

    def __post_init__(self) -> None:
        _choice("schedule.decay", self.decay, ("linear", "cosine"))
        _check(self.total_steps >= 1, "schedule.total_steps must be >= 1")
        _check(
            0 <= self.warmup_steps < self.total_steps or self.total_steps == 1,
            f"schedule.warmup_steps={self.warmup_steps} must be < schedule.total_steps={self.total_steps}; lower it",
        )

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base lr at optimizer step `step` (0-based)."""
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        end = self.end_lr_factor
        if self.decay == "cosine":
            return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * t))
        return end + (1 - end) * (1 - t)


@dataclass
class BatchConfig:
    """global = micro_batch_size × grad_accum × world_size; grad_accum is derived at launch."""

    global_batch_size: int = 4096
    micro_batch_size: int = 32

    def __post_init__(self) -> None:
        _check(self.global_batch_size >= 1 and self.micro_batch_size >= 1, "batch sizes must be >= 1")

    def grad_accum(self, world_size: int) -> int:
        per_rank = self.micro_batch_size * world_size
        if self.global_batch_size % per_rank:
            local = self.global_batch_size // world_size if self.global_batch_size % world_size == 0 else 0
            hint = (
                f"set batch.micro_batch_size to a divisor of {local} (e.g. "
                f"{max(d for d in range(1, min(local, self.micro_batch_size) + 1) if local % d == 0)})"
                if local
                else f"set batch.global_batch_size to a multiple of {per_rank}"
            )
            raise ConfigError(
                f"batch.global_batch_size={self.global_batch_size} is not divisible by ranks ({world_size}) x "
                f"micro_batch_size ({self.micro_batch_size}) x accumulation; {hint}"
            )
        return self.global_batch_size // per_rank


@dataclass
class CheckpointConfig:
    """DeepSpeed checkpoints under <run>/checkpoints/, every `every_steps` and at the end."""

    every_steps: int = 1000
    resume: str = "auto"  # auto: resume if a checkpoint exists | must: fail if none | never
    load_universal: bool = False  # force loading through a universal checkpoint

    def __post_init__(self) -> None:
        _choice("checkpoint.resume", self.resume, ("auto", "must", "never"))
        _check(self.every_steps >= 1, "checkpoint.every_steps must be >= 1")


@dataclass
class LaunchConfig:
    """How ranks are started (pipeline.launcher) and which engine features they use."""

    nproc_per_node: int = 1
    num_nodes: int = 1
    hostfile: str | None = None
    launcher: str = "pdsh"  # pdsh | openmpi | mvapich | slurm | impi
    no_ssh: bool = False
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int = 29500
    accelerator: str = "auto"  # auto | cpu | cuda
    # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 (torch autocast: fp32 weights and optimizer state,
    # matmuls and convs in bf16; also on CPU) | fp16 (DeepSpeed's fp16 engine with loss scaling, GPU only)
    precision: str = "auto"
    zero_stage: int = 0
    bind_cores_to_rank: bool = False
    log_dir: str | None = None  # per-rank logs (default <local run dir>/logs)
    cpu_threads_per_rank: int | None = None  # CPU only: torch threads per rank (default cores // nproc_per_node)
    cores_per_node: int = 0  # sizes data.num_workers=null; 0: the cores the launcher may use (pipeline.cluster.fit_layout)

    def __post_init__(self) -> None:
        _choice("launch.launcher", self.launcher, ("pdsh", "openmpi", "mvapich", "slurm", "impi"))
        _choice("launch.accelerator", self.accelerator, ("auto", "cpu", "cuda"))
        _choice("launch.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _choice("launch.zero_stage", self.zero_stage, (0, 1, 2, 3))
        _check(self.nproc_per_node >= 1 and self.num_nodes >= 1, "launch.nproc_per_node and launch.num_nodes must be >= 1")
        _check(self.cores_per_node >= 0, f"launch.cores_per_node={self.cores_per_node} must be >= 0 (0: this node's cores)")
        if self.no_ssh:
            _check(self.node_rank is not None, "launch.no_ssh needs launch.node_rank (this node's index); pass --node-rank I")
            _check(self.master_addr is not None, "launch.no_ssh needs launch.master_addr (node 0's address); pass --master-addr A")
        if self.node_rank is not None:
            _check(0 <= self.node_rank < self.num_nodes, f"launch.node_rank={self.node_rank} must be in [0, num_nodes={self.num_nodes})")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.num_nodes

    def resolved_accelerator(self, *, cuda_available: bool) -> str:
        if self.accelerator == "auto":
            return "cuda" if cuda_available else "cpu"
        return self.accelerator

    def resolved_precision(self, accelerator: str) -> str:
        if self.precision == "auto":
            return "bf16" if accelerator == "cuda" else "fp32"
        _check(
            accelerator == "cuda" or self.precision != "fp16",
            "launch.precision=fp16 needs a GPU; on CPU use launch.precision=fp32 or bf16",
        )
        return self.precision


@dataclass
class FewshotConfig:
    """Few-shot linear evaluation during pretraining (vit.fewshot): rank 0, every `every_steps` (0: off)
    and at the last step; shots drawn from `data`, accuracy on `val_data`, written to metrics.csv."""

    every_steps: int = 0
    data: str = ""
    val_data: str = ""
    shots: tuple = (1, 5, 10, 25)
    l2: float = 1.0
    draws: int = 5

    def __post_init__(self) -> None:
        self.shots = tuple(int(k) for k in self.shots)
        _check(self.every_steps >= 0, "fewshot.every_steps must be >= 0 (0 turns the evaluation off)")
        _check(bool(self.shots) and all(k >= 1 for k in self.shots), f"fewshot.shots={list(self.shots)}: give shot counts >= 1")
        _check(self.l2 > 0 and self.draws >= 1, "fewshot.l2 must be > 0 and fewshot.draws >= 1")
        if self.every_steps:
            _check(bool(self.data and self.val_data), "fewshot.every_steps is set but fewshot.data / fewshot.val_data "
                   "is empty; set both to dataset URLs (shots are drawn from data, accuracy is measured on val_data)")


SUBCONFIGS = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "batch": BatchConfig,
    "checkpoint": CheckpointConfig,
    "launch": LaunchConfig,
    "fewshot": FewshotConfig,
}


@dataclass
class RunConfig:
    """One training run (pretrain or finetune), composed of the sub-configs above."""

    preset: str = ""
    task: str = "pretrain"  # pretrain | finetune
    run_url: str = ""  # <root>/runs/<run-id>
    run_id: str = ""
    init_from: str | None = None  # finetune: anything vit.checkpoint.load_model accepts
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    fewshot: FewshotConfig = field(default_factory=FewshotConfig)
    seed: int = 0
    log_every: int = 1
    peak_flops: float | None = None  # per-rank peak FLOP/s for MFU; None: measured (CPU) / table (GPU)
    local_dir: str | None = None  # local staging dir when run_url is s3:// (default: /tmp/vitpipe-runs/<run-id>)
    stop_after: int | None = None  # end this launch cleanly after this step (time-boxed jobs); resume later
    parent: str | None = None  # parent run id (finetune: the pretrain run)

    def __post_init__(self) -> None:
        for name, cls in SUBCONFIGS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _build(cls, value, prefix=name))
        _choice("task", self.task, ("pretrain", "finetune"))
        _check(self.log_every >= 1, "log_every must be >= 1")
        self.batch.grad_accum(self.launch.world_size)  # raises with a fix-it message
        _check(not (self.fewshot.every_steps and self.launch.zero_stage == 3),
               "fewshot.every_steps needs the whole model on rank 0, which ZeRO-3 partitions; "
               "use launch.zero_stage <= 2 or evaluate the saved model with `vitpipe evaluate RUN --fewshot`")
        _check(
            self.batch.global_batch_size % self.launch.world_size == 0,
            f"batch.global_batch_size={self.batch.global_batch_size} is not divisible by the {self.launch.world_size} ranks",
        )

    def check_ready(self) -> None:
        """Checks that only matter when a run starts (presets may leave these empty)."""
        _check(bool(self.data.url), "data.url is empty; pass --data DATASET_URL")
        _check(bool(self.run_url), "run_url is empty; pass --out RUNS_ROOT")
        if self.task == "finetune":
            _check(bool(self.init_from), "task=finetune needs init_from (a run folder, model dir, timm or big_vision file)")

    @property
    def local_run_dir(self) -> str:
        """Where ranks on this node keep their working copy of the run (the run folder itself when local)."""
        if self.local_dir:
            return self.local_dir
        run_id = self.run_url.rstrip("/").rsplit("/", 1)[-1]
        return f"/tmp/vitpipe-runs/{run_id}" if self.run_url.startswith("s3://") else self.run_url

    @property
    def log_dir(self) -> str:
        """This node's rank logs and status files."""
        return self.launch.log_dir or os.path.join(self.local_run_dir, "logs", f"node{self.launch.node_rank or 0}")

    @property
    def grad_accum(self) -> int:
        return self.batch.grad_accum(self.launch.world_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        return _build(cls, data, prefix="")


def _build(cls, data: dict, *, prefix: str):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    where = f"{prefix}." if prefix else ""
    _check(not unknown, f"unknown config key(s) {[where + k for k in unknown]}; known keys: {sorted(known)}")
    return cls(**data)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(cfg: RunConfig, items: list[str]) -> RunConfig:
    """Return a new RunConfig with `key=value` overrides (dotted keys, JSON values) applied."""
    return RunConfig.from_dict(override_dict(cfg.to_dict(), items))


def override_dict(data: dict, items: list[str]) -> dict:
    """`data` (a RunConfig dict) with `key=value` overrides applied in place; not validated yet."""
    for item in items:
        _check("=" in item, f"--set {item!r}: expected key=value, e.g. --set optim.lr=0.001")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            _check(isinstance(node.get(p), dict), f"--set {key}: {p!r} is not a config section; sections: {sorted(SUBCONFIGS)}")
            node = node[p]
        leaf = parts[-1]
        if not (len(parts) >= 2 and parts[-2] == "overrides"):
            _check(leaf in node, f"--set {key}: unknown key {leaf!r}; known: {sorted(node)}")
        node[leaf] = _parse_value(text)
    return data


def deepspeed_config(cfg: RunConfig, *, accelerator: str) -> dict:
    """The DeepSpeed config dict for this run (optimizer and scheduler are built by vit.train)."""
    precision = cfg.launch.resolved_precision(accelerator)
    ds: dict[str, Any] = {
        "train_batch_size": cfg.batch.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.batch.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.launch.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": cfg.checkpoint.load_universal},
    }
    if precision == "bf16":  # torch autocast inside the engine's forward; unverified on GPU
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "fp16":  # unverified on GPU
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if cfg.launch.zero_stage >= 1 and accelerator == "cuda":  # unverified on GPU
        ds["zero_optimization"].update({"overlap_comm": True, "contiguous_gradients": True})
    return ds
