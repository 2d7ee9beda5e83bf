"""vit.resample_pos_embed: identity, timm numerics, scipy.ndimage.zoom numerics, dtype, up-and-back."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch
from timm.layers import resample_abs_pos_embed

from vit import resample_pos_embed


def posemb(grid, *, prefix=1, dim=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, prefix + grid[0] * grid[1], dim, generator=g).to(dtype)


def test_identity_when_grid_unchanged():
    pe = posemb((7, 7))
    assert resample_pos_embed(pe, (7, 7)) is pe
    pe2 = posemb((3, 5))
    assert torch.equal(resample_pos_embed(pe2, (3, 5), old_grid=(3, 5)), pe2)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("old,new,prefix", [((14, 14), (24, 24), 1), ((14, 14), (7, 10), 1),
                                            ((6, 9), (12, 4), 0), ((4, 4), (9, 9), 1)])
@pytest.mark.parametrize("antialias", [True, False])
def test_equals_timm(mode, old, new, prefix, antialias):
    pe = posemb(old, prefix=prefix)
    ours = resample_pos_embed(pe, new, old_grid=old, num_prefix_tokens=prefix, mode=mode, antialias=antialias)
    theirs = resample_abs_pos_embed(pe, list(new), old_size=list(old), num_prefix_tokens=prefix,
                                    interpolation=mode, antialias=antialias)
    assert ours.shape == (1, prefix + new[0] * new[1], 16)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours[:, :prefix], pe[:, :prefix])  # prefix tokens kept


@pytest.mark.parametrize("old,new", [((14, 14), (24, 24)), ((14, 14), (7, 9)), ((6, 8), (11, 5)), ((2, 3), (5, 7))])
def test_scipy_linear_equals_scipy_zoom(old, new):
    pe = posemb(old, dim=8)
    ours = resample_pos_embed(pe, new, old_grid=old, mode="scipy_linear")
    # what the official ViT code does (vit_jax checkpoint.py): zoom each grid with order=1
    grid = pe[0, 1:].numpy().reshape(old[0], old[1], -1)
    ref = scipy.ndimage.zoom(grid, (new[0] / old[0], new[1] / old[1], 1), order=1)
    assert ref.shape == (new[0], new[1], 8)
    np.testing.assert_allclose(ours[0, 1:].numpy().reshape(ref.shape), ref, atol=1e-5, rtol=0)
    assert torch.equal(ours[:, :1], pe[:, :1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtype_kept_and_interpolated_in_float32(dtype):
    pe = posemb((6, 6), dtype=dtype)
    out = resample_pos_embed(pe, (9, 9))
    assert out.dtype == dtype
    ref = resample_pos_embed(pe.float(), (9, 9))
    assert torch.equal(out, ref.to(dtype))


def test_up_and_back_stays_close():
    # a smooth field, as learnt position embeddings are (paper Fig. 7)
    h = w = 14
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    field = torch.stack([torch.sin(2 * yy + k) * torch.cos(3 * xx - k) for k in range(8)], -1)
    pe = torch.cat([torch.randn(1, 1, 8), field.reshape(1, h * w, 8)], dim=1)
    for mode in ("bicubic", "bilinear", "scipy_linear"):
        up = resample_pos_embed(pe, (28, 28), mode=mode)
        back = resample_pos_embed(up, (14, 14), mode=mode)
        assert (back - pe).abs().max() < 0.08, mode
        assert torch.equal(back[:, 0], pe[:, 0])


def test_bad_inputs():
    with pytest.raises(ValueError, match="not a square grid: pass old_grid"):
        resample_pos_embed(posemb((3, 5)), (6, 6))
    with pytest.raises(ValueError, match=r"old_grid \(4, 4\) has 16 cells but posemb has 15"):
        resample_pos_embed(posemb((3, 5)), (6, 6), old_grid=(4, 4))
    with pytest.raises(ValueError, match="mode must be one of"):
        resample_pos_embed(posemb((3, 3)), (6, 6), mode="nearest")
    with pytest.raises(ValueError, match=r"\[1, tokens, dim\]"):
        resample_pos_embed(torch.zeros(10, 16), (6, 6))
