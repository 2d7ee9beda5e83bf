"""Weights in and out of other formats: timm state dicts and Google's ``.npz`` checkpoints.

Key layouts
-----------
timm 1.0.31 ``VisionTransformer``: our module names are timm's, so the state dict maps 1:1.
What timm represents differently:

- ``pool="mean"`` -> timm ``global_pool="avg", fc_norm=False`` (final ``norm`` before the
  average over patch tokens, as in the paper/big_vision "gap"); timm's default for "avg"
  (``fc_norm=True``: norm *after* pooling) is a different model and is refused on import.
- ``class_token=False`` -> timm ``class_token=False`` (no prefix tokens in ``pos_embed``).
- ``representation_size`` (pre-logits Linear+tanh): timm 1.0.31 removed that layer, so a
  model with it cannot be exported; run ``prepare_for_finetune`` (which drops it) first.

Google ``.npz`` (google-research/vision_transformer; timm's ``_load_weights`` reads the same):
``embedding/kernel`` [p, p, C, D] (HWIO), ``embedding/bias``, ``cls`` [1, 1, D],
``Transformer/posembed_input/pos_embedding`` [1, N, D],
``Transformer/encoderblock_{i}/LayerNorm_0`` (norm1), ``.../LayerNorm_2`` (norm2),
``.../MultiHeadDotProductAttention_1/{query,key,value}/kernel`` [D, heads, hd] (bias [heads, hd]),
``.../MultiHeadDotProductAttention_1/out/kernel`` [heads, hd, D],
``.../MlpBlock_3/Dense_{0,1}/kernel`` [in, out], ``Transformer/encoder_norm/{scale,bias}``,
``pre_logits/{kernel,bias}``, ``head/{kernel,bias}``. Dense kernels are [in, out] (transposed
w.r.t. torch). big_vision's layout (``params/`` prefix, top-level ``pos_embedding``,
``LayerNorm_1``, ``MultiHeadDotProductAttention_0``, ``MlpBlock_0``) is read too.
"""
from __future__ import annotations

import io
import logging
import math
import os
import re
from typing import Any, Mapping

import numpy as np
import torch
from einops import rearrange

from shards import storage
from shards.errors import VitpipeError

from vit.model import VisionTransformer, ViTConfig, list_models, model_args
from vit.surgery import prepare_for_finetune, resize_model


class CheckpointError(VitpipeError, ValueError):
    """Weights that cannot be loaded as a ViT of this project (names the file and what to do)."""

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- strict loading


def load_state_dict_strict(model: VisionTransformer, state_dict: Mapping[str, torch.Tensor],
                           *, source: str) -> VisionTransformer:
    """``model.load_state_dict(strict=True)`` with an error that names the keys and shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def short(xs: list[str]) -> str:
            return ", ".join(xs[:8]) + (f", ... ({len(xs)} in all)" if len(xs) > 8 else "")
        parts = [f"missing keys: {short(missing)}" if missing else "",
                 f"unexpected keys: {short(unexpected)}" if unexpected else "",
                 f"shape mismatch: {short(shapes)}" if shapes else ""]
        raise CheckpointError(f"{source}: weights do not fit {model.cfg.name or 'the model'} ("
                         + "; ".join(p for p in parts if p)
                         + "); is this a ViT checkpoint of the same architecture?")
    model.load_state_dict(state_dict, strict=True)
    return model


def adapt_model(model: VisionTransformer, *, img_size: Any, num_classes: int | None,
            mode: str) -> VisionTransformer:
    """Resample to ``img_size`` / put a new zero head for ``num_classes``, on purpose and logged."""
    if num_classes is not None and num_classes != model.cfg.num_classes:
        return prepare_for_finetune(model, num_classes=num_classes,
                                    img_size=img_size or model.img_size, mode=mode)
    if img_size is not None:
        resize_model(model, img_size=img_size, mode=mode)
    return model


# ----------------------------------------------------------------------------- timm


def timm_kwargs(cfg: ViTConfig | dict[str, Any]) -> dict[str, Any]:
    """Arguments for ``timm.models.vision_transformer.VisionTransformer`` of the same model."""
    c = cfg if isinstance(cfg, ViTConfig) else ViTConfig(**cfg)
    if c.representation_size:
        raise ValueError("timm 1.0.31's VisionTransformer has no pre-logits layer; drop it with "
                         "vit.prepare_for_finetune(...) before exporting to timm")
    return dict(img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans,
                num_classes=c.num_classes, embed_dim=c.embed_dim, depth=c.depth,
                num_heads=c.num_heads, mlp_ratio=c.mlp_dim / c.embed_dim,
                class_token=c.class_token, global_pool="token" if c.pool == "cls" else "avg",
                fc_norm=False, drop_rate=0.0, pos_drop_rate=c.drop_rate, proj_drop_rate=c.drop_rate,
                attn_drop_rate=c.attn_drop_rate, drop_path_rate=c.drop_path_rate)


def to_timm_state_dict(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """State dict loadable (strict) by timm's VisionTransformer(**timm_kwargs(model.cfg))."""
    timm_kwargs(model.cfg)  # refuses what timm cannot represent
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _infer_config(shapes: Mapping[str, tuple[int, ...]], name: str | None,
                  overrides: dict[str, Any], *, source: str) -> ViTConfig:
    """Architecture from tensor shapes (timm key names), completed by registry ``name``."""
    if "patch_embed.proj.weight" not in shapes or "pos_embed" not in shapes:
        found = ", ".join(sorted(shapes)[:6])
        raise CheckpointError(f"{source}: not a ViT state dict (no patch_embed.proj.weight / pos_embed; "
                         f"found {found}, ...)")
    if "fc_norm.weight" in shapes:
        raise CheckpointError(f"{source}: has fc_norm (timm global_pool='avg' with norm after pooling), "
                         "which this ViT does not implement; export it with fc_norm=False")
    d, c, p, _ = shapes["patch_embed.proj.weight"]
    depth = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
    class_token = "cls_token" in shapes
    n_patch = shapes["pos_embed"][1] - (1 if class_token else 0)
    side = math.isqrt(n_patch)
    inferred: dict[str, Any] = dict(patch_size=p, in_chans=c, embed_dim=d, depth=depth,
                                    class_token=class_token)
    if depth:
        inferred["mlp_dim"] = shapes["blocks.0.mlp.fc1.weight"][0]
    if "pre_logits.fc.weight" in shapes:
        inferred["representation_size"] = shapes["pre_logits.fc.weight"][0]
    inferred["num_classes"] = shapes["head.weight"][0] if "head.weight" in shapes else 0
    if not class_token:
        inferred["pool"] = "mean"
    if name is None:  # num_heads is not in any shape: take it from the registry entry that fits
        for cand in list_models():
            a = model_args(cand)
            if (a["embed_dim"], a["depth"], a["patch_size"]) == (d, depth, p):
                name = cand
                break
    base = {}
    if name is not None:
        base = model_args(name)
    elif "num_heads" not in overrides:
        raise CheckpointError(f"{source}: embed_dim={d}, depth={depth}, patch={p} matches no registry model; "
                         "pass name=... or num_heads=...")
    img_size = overrides.pop("checkpoint_img_size", None)
    if img_size is None:
        if side * side != n_patch:
            raise CheckpointError(f"{source}: {n_patch} position embeddings are not a square grid; "
                             "pass checkpoint_img_size=(h, w)")
        img_size = side * p
    args = {**base, **inferred, **overrides}
    return ViTConfig(img_size=img_size, name=name, **args)


def from_timm_state_dict(state_dict: Mapping[str, torch.Tensor], name: str | None = None, *,
                         img_size: int | tuple[int, int] | None = None, num_classes: int | None = None,
                         mode: str = "bicubic", source: str = "timm state dict",
                         **overrides: Any) -> VisionTransformer:
    """A model holding a timm VisionTransformer state dict (strict).

    The architecture comes from the tensor shapes plus ``name`` (for num_heads; inferred from
    the registry if omitted) and ``overrides`` (e.g. ``pool="mean"``). If ``img_size`` differs
    from the checkpoint's, position embeddings are resampled (``mode``) and logged; if
    ``num_classes`` differs, a new zero head is installed (``prepare_for_finetune``).
    """
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    cfg = _infer_config(shapes, name, dict(overrides), source=source)
    with torch.device("meta"):
        model = VisionTransformer(cfg)
    model = model.to_empty(device="cpu")
    load_state_dict_strict(model, state_dict, source=source)
    return adapt_model(model, img_size=img_size, num_classes=num_classes, mode=mode)


# ----------------------------------------------------------------------------- google .npz


def _layout(keys: set[str]) -> tuple[str, str, dict[str, str]]:
    """(prefix, pos-embedding key, sub-module names) for the two Google layouts."""
    for prefix in ("", "params/", "opt/target/", "params/img/"):
        if f"{prefix}embedding/kernel" in keys:
            break
    else:
        raise CheckpointError("no 'embedding/kernel' in the .npz: not a ViT checkpoint from "
                         "google-research/vision_transformer or big_vision")
    if f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in keys:
        raise CheckpointError("scanned big_vision checkpoint (Transformer/encoderblock/ stacked over "
                         "depth) is not supported; export it unscanned")
    big_vision = f"{prefix}pos_embedding" in keys
    pos = f"{prefix}pos_embedding" if big_vision else f"{prefix}Transformer/posembed_input/pos_embedding"
    sub = (dict(ln2="LayerNorm_1", mha="MultiHeadDotProductAttention_0", mlp="MlpBlock_0")
           if big_vision else
           dict(ln2="LayerNorm_2", mha="MultiHeadDotProductAttention_1", mlp="MlpBlock_3"))
    return prefix, pos, sub


def npz_to_timm_state_dict(w: Mapping[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], int]:
    """Google ``.npz`` arrays -> (timm-named state dict, num_heads)."""
    prefix, pos_key, sub = _layout(set(w))

    def t(key: str) -> torch.Tensor:
        full = prefix + key
        if full not in w:
            raise CheckpointError(f"missing key {full!r} in the .npz")
        return torch.from_numpy(np.asarray(w[full], dtype=np.float32).copy())

    pe = t(pos_key[len(prefix):])
    sd: dict[str, torch.Tensor] = {
        "patch_embed.proj.weight": rearrange(t("embedding/kernel"), "h w i o -> o i h w"),
        "patch_embed.proj.bias": t("embedding/bias"),
        "pos_embed": pe.reshape(1, -1, pe.shape[-1]),
        "norm.weight": t("Transformer/encoder_norm/scale"),
        "norm.bias": t("Transformer/encoder_norm/bias"),
    }
    if prefix + "cls" in w:
        sd["cls_token"] = t("cls").reshape(1, 1, -1)
    blocks = sorted({int(m.group(1)) for k in w
                     if (m := re.match(re.escape(prefix) + r"Transformer/encoderblock_(\d+)/", k))})
    if blocks != list(range(len(blocks))):
        raise CheckpointError(f"encoder blocks in the .npz are not 0..n-1: {blocks}")
    heads = 0
    for i in blocks:
        b, mha, mlp = f"Transformer/encoderblock_{i}/", f"Transformer/encoderblock_{i}/{sub['mha']}/", \
            f"Transformer/encoderblock_{i}/{sub['mlp']}/"
        q = t(mha + "query/kernel")
        heads = q.shape[1]
        sd |= {
            f"blocks.{i}.norm1.weight": t(b + "LayerNorm_0/scale"),
            f"blocks.{i}.norm1.bias": t(b + "LayerNorm_0/bias"),
            f"blocks.{i}.attn.qkv.weight": torch.cat(
                [rearrange(t(mha + f"{n}/kernel"), "i h d -> (h d) i") for n in ("query", "key", "value")]),
            f"blocks.{i}.attn.qkv.bias": torch.cat(
                [t(mha + f"{n}/bias").reshape(-1) for n in ("query", "key", "value")]),
            f"blocks.{i}.attn.proj.weight": rearrange(t(mha + "out/kernel"), "h d o -> o (h d)"),
            f"blocks.{i}.attn.proj.bias": t(mha + "out/bias"),
            f"blocks.{i}.norm2.weight": t(b + f"{sub['ln2']}/scale"),
            f"blocks.{i}.norm2.bias": t(b + f"{sub['ln2']}/bias"),
            f"blocks.{i}.mlp.fc1.weight": t(mlp + "Dense_0/kernel").T.contiguous(),
            f"blocks.{i}.mlp.fc1.bias": t(mlp + "Dense_0/bias"),
            f"blocks.{i}.mlp.fc2.weight": t(mlp + "Dense_1/kernel").T.contiguous(),
            f"blocks.{i}.mlp.fc2.bias": t(mlp + "Dense_1/bias"),
        }
    for ours, theirs in (("pre_logits.fc", "pre_logits"), ("head", "head")):
        if f"{prefix}{theirs}/kernel" in w:
            sd[f"{ours}.weight"] = t(f"{theirs}/kernel").T.contiguous()
            sd[f"{ours}.bias"] = t(f"{theirs}/bias")
    return sd, heads


def load_big_vision_npz(path: str | os.PathLike, name: str | None = None, *,
                        img_size: int | tuple[int, int] | None = None, num_classes: int | None = None,
                        mode: str = "bicubic", **overrides: Any) -> VisionTransformer:
    """A model from a google-research/vision_transformer or big_vision ``.npz`` (unscanned),
    at a local path or ``s3://`` URL.

    num_heads is read from the query kernel shape; position embeddings are resampled to
    ``img_size`` with ``mode`` (use ``"scipy_linear"`` to match the official code) and logged.
    """
    with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    try:
        sd, heads = npz_to_timm_state_dict(arrays)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    overrides.setdefault("num_heads", heads)
    return from_timm_state_dict(sd, name, img_size=img_size, num_classes=num_classes, mode=mode,
                                source=str(path), **overrides)


def save_big_vision_npz(model: VisionTransformer, path: str | os.PathLike) -> None:
    """Write the model in the google-research/vision_transformer ``.npz`` layout (atomic;
    local path or ``s3://`` URL)."""
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    h = model.cfg.num_heads
    out: dict[str, np.ndarray] = {
        "embedding/kernel": rearrange(sd["patch_embed.proj.weight"], "o i h w -> h w i o"),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    if "cls_token" in sd:
        out["cls"] = sd["cls_token"]
    for i in range(model.cfg.depth):
        p, b = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha, mlp = b + "MultiHeadDotProductAttention_1/", b + "MlpBlock_3/"
        qkv_w = rearrange(sd[p + "attn.qkv.weight"], "(three h d) i -> three i h d", three=3, h=h)
        qkv_b = rearrange(sd[p + "attn.qkv.bias"], "(three h d) -> three h d", three=3, h=h)
        for j, n in enumerate(("query", "key", "value")):
            out[mha + f"{n}/kernel"], out[mha + f"{n}/bias"] = qkv_w[j], qkv_b[j]
        out |= {
            b + "LayerNorm_0/scale": sd[p + "norm1.weight"], b + "LayerNorm_0/bias": sd[p + "norm1.bias"],
            mha + "out/kernel": rearrange(sd[p + "attn.proj.weight"], "o (h d) -> h d o", h=h),
            mha + "out/bias": sd[p + "attn.proj.bias"],
            b + "LayerNorm_2/scale": sd[p + "norm2.weight"], b + "LayerNorm_2/bias": sd[p + "norm2.bias"],
            mlp + "Dense_0/kernel": sd[p + "mlp.fc1.weight"].T, mlp + "Dense_0/bias": sd[p + "mlp.fc1.bias"],
            mlp + "Dense_1/kernel": sd[p + "mlp.fc2.weight"].T, mlp + "Dense_1/bias": sd[p + "mlp.fc2.bias"],
        }
    for ours, theirs in (("pre_logits.fc", "pre_logits"), ("head", "head")):
        if f"{ours}.weight" in sd:
            out[f"{theirs}/kernel"], out[f"{theirs}/bias"] = sd[f"{ours}.weight"].T, sd[f"{ours}.bias"]
    buf = io.BytesIO()
    np.savez(buf, **{k: np.ascontiguousarray(v.numpy()) for k, v in out.items()})
    storage.write_bytes(path, buf.getvalue())  # atomic, local path or s3://


__all__ = ["load_state_dict_strict", "adapt_model", "timm_kwargs", "to_timm_state_dict", "from_timm_state_dict",
           "npz_to_timm_state_dict", "load_big_vision_npz", "save_big_vision_npz"]
