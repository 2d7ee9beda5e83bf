"""Finished models in the formats other tools open: a timm model folder, big_vision ``.npz``,
this project's ``model.safetensors``.

A timm model folder is what ``timm.create_model('local-dir:<folder>', pretrained=True)`` reads:
``config.json`` {``architecture`` (a timm model name), ``num_classes``, ``model_args``,
``pretrained_cfg``} and ``model.safetensors`` in timm's key layout. ``model_args`` hold every
architecture field, so the folder rebuilds the exact model whatever the registry default is.

timm's VisionTransformer has no pre-logits layer (the paper's Linear + tanh before the
pretraining head). A model with one is exported features-only: ``num_classes=0``, neither
``pre_logits.fc`` nor ``head`` in the weights, so timm's output is the pooled features (the
pre-logits *input*); ``pretrained_cfg.notes`` and ``vitpipe.dropped`` say so.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
from safetensors.torch import save as st_save

from shards import storage
from vit.augment import INCEPTION_MEAN, INCEPTION_STD
from vit.interop import save_big_vision_npz, timm_kwargs
from vit.model import VisionTransformer

log = logging.getLogger(__name__)

TIMM_FOLDER = "timm"  # the timm model folder inside a run folder
FORMATS = ("timm", "npz", "safetensors")
# this project's registry name -> timm's architecture of the same shape (its model_args pin the rest)
_TIMM_ARCH = {
    "vit_tiny_patch16": "vit_tiny_patch16_224",
    "vit_small_patch16": "vit_small_patch16_224",
    "vit_base_patch16": "vit_base_patch16_224",
    "vit_base_patch32": "vit_base_patch32_224",
    "vit_large_patch16": "vit_large_patch16_224",
    "vit_large_patch32": "vit_large_patch32_224",
    "vit_huge_patch14": "vit_huge_patch14_224",
}


def timm_architecture(name: str | None) -> str:
    """The timm model name for this project's registry ``name`` (ViT-B/16 for unnamed models;
    ``model_args`` override every field either way)."""
    return _TIMM_ARCH.get(name or "", "vit_base_patch16_224")


def timm_model_config(model: VisionTransformer, *, label_names: list[str] | None = None) -> dict[str, Any]:
    """timm's ``config.json`` for ``model`` (features-only when it has a pre-logits layer)."""
    cfg = model.cfg
    features_only = bool(cfg.representation_size)
    num_classes = 0 if features_only else cfg.num_classes
    args = timm_kwargs({**cfg.to_dict(), "representation_size": None, "num_classes": num_classes})
    args.pop("num_classes")
    args["img_size"] = list(cfg.img_size)
    pretrained_cfg: dict[str, Any] = {
        "tag": "vitpipe",
        "custom_load": False,
        "input_size": [cfg.in_chans, *cfg.img_size],
        "fixed_input_size": True,
        "interpolation": "bilinear",  # what vit.augment resizes with
        "crop_pct": 0.875,
        "crop_mode": "center",
        "mean": list(INCEPTION_MEAN),
        "std": list(INCEPTION_STD),
        "num_classes": num_classes,
        "pool_size": None,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    if label_names and not features_only and len(label_names) == num_classes:
        pretrained_cfg["label_names"] = list(label_names)
    config: dict[str, Any] = {
        "architecture": timm_architecture(cfg.name),
        "num_classes": num_classes,
        "num_features": cfg.embed_dim,
        "global_pool": args["global_pool"],
        "model_args": args,
        "pretrained_cfg": pretrained_cfg,
        "vitpipe": {"model_config": cfg.to_dict(), "features_only": features_only, "dropped": []},
    }
    if features_only:
        dropped = [f"pre_logits.fc (Linear {cfg.embed_dim}->{cfg.representation_size} + tanh)"]
        if cfg.num_classes:
            dropped.append(f"head (Linear {cfg.representation_size}->{cfg.num_classes})")
        config["vitpipe"]["dropped"] = dropped
        pretrained_cfg["notes"] = [
            "features-only export: timm's VisionTransformer has no pre-logits layer, so "
            + " and ".join(dropped) + " are not included; the model outputs the pooled features "
            "(the pre-logits input). Fine-tune it with num_classes=K for a new zero head."]
    return config


def timm_state_dict(model: VisionTransformer) -> dict[str, torch.Tensor]:
    """The weights under timm's key names (without pre-logits and head for a features-only export)."""
    raw = getattr(model, "module", model)
    features_only = bool(raw.cfg.representation_size)
    return {k: v.detach().to("cpu").contiguous() for k, v in raw.state_dict().items()
            if not (features_only and k.startswith(("pre_logits.", "head.")))}


def export_timm(model: VisionTransformer, dir_url: str | os.PathLike, *,
                label_names: list[str] | None = None) -> str:
    """Write a timm model folder (``model.safetensors``, then ``config.json`` last) under ``dir_url``
    (local folder or ``s3://`` prefix); returns ``dir_url``."""
    raw = getattr(model, "module", model)  # DeepSpeed/DDP wrappers hold the model in .module
    dir_url = str(dir_url)
    config = timm_model_config(raw, label_names=label_names)
    cfg_url = storage.join(dir_url, "config.json")
    if storage.exists(cfg_url):  # overwriting: a crash below must not leave an old config on new weights
        storage.delete(cfg_url)
    storage.write_bytes(storage.join(dir_url, "model.safetensors"),
                        st_save(timm_state_dict(raw), metadata={"format": "pt"}))
    storage.write_json(cfg_url, config)
    if config["vitpipe"]["features_only"]:
        log.info("timm export %s is features-only (dropped %s)", dir_url, ", ".join(config["vitpipe"]["dropped"]))
    return dir_url


def export_model(model: VisionTransformer, fmt: str, dest: str | os.PathLike, *,
                 label_names: list[str] | None = None) -> list[str]:
    """Write ``model`` to the folder ``dest`` as ``fmt`` (timm | npz | safetensors); returns the files written."""
    from vit.checkpoint import CONFIG, WEIGHTS, save_model

    dest = str(dest)
    if fmt == "timm":
        export_timm(model, dest, label_names=label_names)
        return [storage.join(dest, "model.safetensors"), storage.join(dest, "config.json")]
    if fmt == "npz":
        url = storage.join(dest, "model.npz")
        save_big_vision_npz(model, url)
        return [url]
    if fmt == "safetensors":
        save_model(model, dest)
        return [storage.join(dest, WEIGHTS), storage.join(dest, CONFIG)]
    raise ValueError(f"export format {fmt!r} is not one of {list(FORMATS)}")


__all__ = ["TIMM_FOLDER", "FORMATS", "timm_architecture", "timm_model_config", "timm_state_dict", "export_timm",
           "export_model"]
