"""The Vision Transformer of Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021).

Strided-conv patch embedding, learnable class token, learnable 1-D position embedding,
pre-norm encoder blocks (LN -> MHSA -> residual; LN -> MLP(GELU) -> residual), final LN,
pool (class token or mean of patch tokens), optional pre-logits (Linear + tanh), head.
Module and parameter names follow timm's VisionTransformer, so weights move with a
near-identity key map (see vit.interop).

Initialisation (stated, as the brief asks): Linear weights xavier-uniform with zero bias
(big_vision), patch-embedding conv lecun-normal (Flax default), position embedding
trunc-normal std 0.02 (cut at 2 std) and class token normal std 1e-6 (both as timm),
head weight and bias exactly zero (big_vision ``head_zeroinit``).

This file has no I/O, no DeepSpeed and no Prefect: it is the model only.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[[], dict[str, Any]]] = {}


def _register(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    _REGISTRY[fn.__name__] = fn
    return fn


@_register
def vit_tiny_patch16() -> dict[str, Any]:
    """ViT-Ti/16: DeiT (Touvron et al. 2021, Table 1) / AugReg (Steiner et al. 2021)."""
    return dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_dim=768)


@_register
def vit_small_patch16() -> dict[str, Any]:
    """ViT-S/16: DeiT (Touvron et al. 2021, Table 1) / AugReg (Steiner et al. 2021)."""
    return dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_dim=1536)


@_register
def vit_base_patch16() -> dict[str, Any]:
    """ViT-B/16: Dosovitskiy et al. 2020, Table 1 (Base)."""
    return dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_dim=3072)


@_register
def vit_base_patch32() -> dict[str, Any]:
    """ViT-B/32: Dosovitskiy et al. 2020, Table 1 (Base)."""
    return dict(patch_size=32, embed_dim=768, depth=12, num_heads=12, mlp_dim=3072)


@_register
def vit_large_patch16() -> dict[str, Any]:
    """ViT-L/16: Dosovitskiy et al. 2020, Table 1 (Large)."""
    return dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096)


@_register
def vit_large_patch32() -> dict[str, Any]:
    """ViT-L/32: Dosovitskiy et al. 2020, Table 1 (Large)."""
    return dict(patch_size=32, embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096)


@_register
def vit_huge_patch14() -> dict[str, Any]:
    """ViT-H/14: Dosovitskiy et al. 2020, Table 1 (Huge)."""
    return dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, mlp_dim=5120)


def list_models() -> list[str]:
    """The registry names accepted by :func:`create_model`."""
    return sorted(_REGISTRY)


def model_args(name: str) -> dict[str, Any]:
    """The registry entry ``name`` (patch_size, embed_dim, depth, num_heads, mlp_dim)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; accepted: {', '.join(list_models())}")
    return _REGISTRY[name]()


# ----------------------------------------------------------------------------- config


def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(x) for x in v)
    if len(t) != 2:
        raise ValueError(f"img_size must be an int or (height, width), got {v!r}")
    return t  # type: ignore[return-value]


@dataclasses.dataclass
class ViTConfig:
    """Everything that defines the architecture; ``dataclasses.asdict`` of it is JSON-able."""

    num_classes: int
    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    pool: str = "cls"
    class_token: bool = True
    representation_size: int | None = None
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    name: str | None = None

    def __post_init__(self) -> None:
        self.img_size = _pair(self.img_size)
        h, w, p = *self.img_size, self.patch_size
        if p <= 0:
            raise ValueError(f"patch_size must be positive, got {p}")
        if h % p or w % p:
            bad = h if h % p else w
            lo, hi = (bad // p) * p, (bad // p + 1) * p
            sizes = f"{lo} or {hi}" if lo else f"{hi}"
            raise ValueError(
                f"img_size {self.img_size} is not divisible by patch_size {p}: "
                f"{bad} -> use a multiple of {p}, e.g. {sizes}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
        if self.pool == "cls" and not self.class_token:
            raise ValueError("pool='cls' needs class_token=True; use pool='mean' for a model without class token")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = no head), got {self.num_classes}")
        if self.representation_size is not None and self.representation_size <= 0:
            raise ValueError(f"representation_size must be None or a positive int, got {self.representation_size}")
        for k in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, k) < 1.0:
                raise ValueError(f"{k} must be in [0, 1), got {getattr(self, k)}")

    @property
    def grid(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.class_token else 0

    def flops_per_block(self) -> int:
        """Forward FLOPs of one encoder block for one image (qkv, q k^T, attn v, proj, MLP)."""
        t, d = self.grid[0] * self.grid[1] + self.num_prefix_tokens, self.embed_dim
        return 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * self.mlp_dim

    def flops_per_image(self) -> int:
        """Forward FLOPs of one image (matmuls and conv; multiply-add = 2; norms/softmax ignored)."""
        n = self.grid[0] * self.grid[1]
        d = self.embed_dim
        f = 2 * n * self.in_chans * self.patch_size**2 * d + self.depth * self.flops_per_block()
        out = d
        if self.representation_size:
            f += 2 * d * self.representation_size
            out = self.representation_size
        return f + 2 * out * self.num_classes

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["img_size"] = list(self.img_size)
        return d


# ----------------------------------------------------------------------------- modules


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016), identity in eval mode."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class PatchEmbed(nn.Module):
    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(x), "b d h w -> b (h w) d")


class Attention(nn.Module):
    def __init__(self, *, dim: int, num_heads: int, attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x).unbind(0)
        drop = self.attn_drop if self.training else 0.0
        # one fused kernel: flash / memory-efficient attention on GPU (unverified on GPU here), fused CPU kernel
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        return self.proj_drop(self.proj(rearrange(x, "b h n d -> b n (h d)")))

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) written out, [B, heads, N, N]; for inspection only."""
        q, k, _ = self._qkv(x).unbind(0)
        return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)


class Mlp(nn.Module):
    def __init__(self, *, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig, drop_path: float) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = Attention(dim=d, num_heads=cfg.num_heads, attn_drop=cfg.attn_drop_rate,
                              proj_drop=cfg.drop_rate)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = Mlp(dim=d, hidden=cfg.mlp_dim, drop=cfg.drop_rate)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PreLogits(nn.Module):
    """The paper's pre-training representation layer: Linear + tanh."""

    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, size)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        n_tokens = cfg.grid[0] * cfg.grid[1] + cfg.num_prefix_tokens
        self.patch_embed = PatchEmbed(patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, d))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear decay
        self.blocks = nn.Sequential(*[Block(cfg, r) for r in rates])
        self.norm = nn.LayerNorm(d, eps=1e-6)
        rep = cfg.representation_size
        self.pre_logits = PreLogits(d, rep) if rep else nn.Identity()
        self.head = nn.Linear(rep or d, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.grad_checkpointing = False  # a training setting, not architecture: not in cfg
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        w = self.patch_embed.proj.weight
        std = math.sqrt(1.0 / w[0].numel()) / 0.87962566  # lecun-normal: truncated at 2 std
        nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(self.patch_embed.proj.bias)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    # -- read-only views of the config
    @property
    def config(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    @property
    def img_size(self) -> tuple[int, int]:
        return self.cfg.img_size

    @property
    def patch_size(self) -> int:
        return self.cfg.patch_size

    @property
    def grid(self) -> tuple[int, int]:
        return self.cfg.grid

    @property
    def num_prefix_tokens(self) -> int:
        return self.cfg.num_prefix_tokens

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Keep only each block's input for backward and recompute the block then (timm's switch):
        block activations drop to one [B, N, D] tensor per block, for ~1/3 more compute."""
        self.grad_checkpointing = enable

    # -- forward
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(
                f"input is {tuple(x.shape[-2:])} but the model expects {self.img_size}; "
                f"resize the images or call vit.prepare_for_finetune(model, img_size=...)")
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> tokens [B, N, D] after the final LayerNorm."""
        x = self._embed(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            for blk in self.blocks:
                x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens -> logits (or the pooled/pre-logits features when ``pre_logits``)."""
        x = x[:, 0] if self.cfg.pool == "cls" else x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.pre_logits(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per block, the softmax attention [B, heads, N, N] (explicit, for inspection)."""
        maps = []
        x = self._embed(x)
        for blk in self.blocks:
            maps.append(blk.attn.attention_map(blk.norm1(x)))
            x = blk(x)
        return maps

    def flops_per_image(self) -> int:
        """Forward FLOPs of one image (see ViTConfig.flops_per_image)."""
        return self.cfg.flops_per_image()


# ----------------------------------------------------------------------------- factory


def create_model(name: str, *, num_classes: int, img_size: int | tuple[int, int] = 224,
                 **overrides: Any) -> VisionTransformer:
    """Build a registry model, e.g. ``create_model("vit_base_patch16", num_classes=1000)``.

    ``overrides`` may set any :class:`ViTConfig` field (patch_size, embed_dim, depth,
    num_heads, mlp_dim, pool, representation_size, drop_rate, attn_drop_rate,
    drop_path_rate, in_chans, class_token).
    """
    return VisionTransformer(model_config(name, num_classes=num_classes, img_size=img_size, **overrides))


def model_config(name: str, *, num_classes: int, img_size: int | tuple[int, int] = 224,
                 **overrides: Any) -> ViTConfig:
    """The :class:`ViTConfig` that ``create_model`` with the same arguments builds (no weights)."""
    base = model_args(name)
    fields = {f.name for f in dataclasses.fields(ViTConfig)} - {"name", "num_classes", "img_size"}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise TypeError(f"unknown override(s) {bad} for {name}; accepted: {sorted(fields)}")
    return ViTConfig(num_classes=num_classes, img_size=img_size, name=name, **{**base, **overrides})


def model_from_config(cfg: dict[str, Any]) -> VisionTransformer:
    """Rebuild a model from ``model.config`` (e.g. read back from model_config.json)."""
    known = {f.name for f in dataclasses.fields(ViTConfig)}
    bad = sorted(set(cfg) - known)
    if bad:
        raise ValueError(f"model config has unknown field(s) {bad}; known: {sorted(known)}")
    return VisionTransformer(ViTConfig(**cfg))
