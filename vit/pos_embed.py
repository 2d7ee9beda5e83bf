"""Resampling learnt 1-D position embeddings to a new patch grid (paper section 3.2).

The one place where position embeddings change size; every loader calls it on purpose.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

MODES = ("bicubic", "bilinear", "scipy_linear")


def _grid(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def resample_pos_embed(posemb: torch.Tensor, new_grid: int | tuple[int, int],
                       old_grid: int | tuple[int, int] | None = None, num_prefix_tokens: int = 1,
                       mode: str = "bicubic", antialias: bool = True) -> torch.Tensor:
    """2-D interpolate the patch part of ``posemb`` [1, prefix + h*w, D] to ``new_grid``.

    Prefix (class) tokens are kept as they are. Interpolation runs in float32 and the
    result has the input dtype. ``mode``:

    - ``"bicubic"`` / ``"bilinear"``: ``F.interpolate`` with ``antialias`` (same numerics
      as ``timm.layers.resample_abs_pos_embed``);
    - ``"scipy_linear"``: what the official ViT code does, ``scipy.ndimage.zoom(order=1)``
      per grid, i.e. linear interpolation with the corner samples aligned (no antialias).

    ``old_grid`` may be omitted when the old grid is square.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise ValueError(f"posemb must be [1, tokens, dim], got {tuple(posemb.shape)}")
    new_grid = _grid(new_grid)
    n_patch = posemb.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(max(n_patch, 0))
        if side * side != n_patch:
            raise ValueError(
                f"posemb has {n_patch} patch tokens, not a square grid: pass old_grid=(h, w)")
        old_grid = (side, side)
    old_grid = _grid(old_grid)
    if old_grid[0] * old_grid[1] != n_patch:
        raise ValueError(f"old_grid {old_grid} has {old_grid[0] * old_grid[1]} cells but posemb has "
                         f"{n_patch} patch tokens (+{num_prefix_tokens} prefix)")
    if old_grid == new_grid:
        return posemb

    prefix, patches = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    grid = rearrange(patches.float(), "1 (h w) d -> 1 d h w", h=old_grid[0], w=old_grid[1])
    if mode == "scipy_linear":
        grid = F.interpolate(grid, size=new_grid, mode="bilinear", align_corners=True, antialias=False)
    else:
        grid = F.interpolate(grid, size=new_grid, mode=mode, antialias=antialias)
    patches = rearrange(grid, "1 d h w -> 1 (h w) d").to(posemb.dtype)
    return torch.cat([prefix, patches], dim=1)
