"""Model surgery for fine-tuning (paper section 3.2): new zero head, higher resolution."""
from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from vit.model import VisionTransformer
from vit.pos_embed import resample_pos_embed

log = logging.getLogger(__name__)


def resize_model(model: VisionTransformer, *, img_size: int | tuple[int, int],
                 mode: str = "bicubic") -> VisionTransformer:
    """Change the model's input size in place, resampling the position embeddings."""
    new_cfg = dataclasses.replace(model.cfg, img_size=img_size)  # validates divisibility
    if new_cfg.grid != model.grid:
        log.info("resampling position embeddings: grid %s -> %s (img_size %s -> %s, mode=%s)",
                 model.grid, new_cfg.grid, model.img_size, new_cfg.img_size, mode)
        with torch.no_grad():
            pe = resample_pos_embed(model.pos_embed.data, new_cfg.grid, old_grid=model.grid,
                                    num_prefix_tokens=model.num_prefix_tokens, mode=mode)
        model.pos_embed = nn.Parameter(pe.contiguous(), requires_grad=model.pos_embed.requires_grad)
    model.cfg = new_cfg
    return model


def prepare_for_finetune(model: VisionTransformer, *, num_classes: int,
                         img_size: int | tuple[int, int], mode: str = "bicubic") -> VisionTransformer:
    """Drop the pre-logits layer, install a zero-initialised D x K head (weight and bias), and
    resample the position embeddings to the grid of ``img_size``. Modifies and returns ``model``."""
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive for fine-tuning, got {num_classes}")
    resize_model(model, img_size=img_size, mode=mode)
    ref = model.pos_embed
    head = nn.Linear(model.cfg.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    log.info("fine-tune head: %s classes -> %d (pre-logits %s -> dropped)",
             model.cfg.num_classes, num_classes, model.cfg.representation_size)
    model.pre_logits = nn.Identity()
    model.head = head
    model.cfg = dataclasses.replace(model.cfg, num_classes=num_classes, representation_size=None)
    return model
