"""vit.prepare_for_finetune: zero D x K head, no pre-logits, resampled position embeddings."""
from __future__ import annotations

import logging
import math

import pytest
import torch

import vit


def pretrained(**kw):
    torch.manual_seed(0)
    m = vit.create_model("vit_tiny_patch16", num_classes=21, img_size=32, depth=2, representation_size=48, **kw)
    for p in m.parameters():  # pretend it was trained: nothing zero anywhere
        p.data.normal_(0, 0.05)
    return m


def test_zero_head_no_prelogits_new_grid(caplog):
    m = pretrained()
    old_pe = m.pos_embed.detach().clone()
    with caplog.at_level(logging.INFO, logger="vit.surgery"):
        out = vit.prepare_for_finetune(m, num_classes=10, img_size=(64, 48))
    assert out is m
    assert "grid (2, 2) -> (4, 3)" in caplog.text
    assert isinstance(m.pre_logits, torch.nn.Identity) and "pre_logits.fc.weight" not in m.state_dict()
    assert m.head.weight.shape == (10, 192)
    assert torch.count_nonzero(m.head.weight) == 0 and torch.count_nonzero(m.head.bias) == 0
    assert m.pos_embed.shape == (1, 1 + 12, 192)
    assert torch.equal(m.pos_embed[:, :1], old_pe[:, :1])
    expected = vit.resample_pos_embed(old_pe, (4, 3), old_grid=(2, 2))
    assert torch.equal(m.pos_embed.detach(), expected)
    assert m.img_size == (64, 48) and m.grid == (4, 3)
    cfg = m.config
    assert cfg["num_classes"] == 10 and cfg["img_size"] == [64, 48] and cfg["representation_size"] is None
    rebuilt = vit.model_from_config(cfg)
    rebuilt.load_state_dict(m.state_dict())  # config and weights agree
    with pytest.raises(ValueError, match="expects"):
        m(torch.randn(1, 3, 32, 32))


def test_first_loss_is_ln_k_and_head_learns():
    m = pretrained()
    vit.prepare_for_finetune(m, num_classes=7, img_size=48)
    x, y = torch.randn(4, 3, 48, 48), torch.tensor([0, 3, 6, 2])
    logits = m(x)
    assert torch.count_nonzero(logits) == 0
    loss = torch.nn.functional.cross_entropy(logits, y)
    assert loss.item() == pytest.approx(math.log(7), abs=1e-6)
    loss.backward()
    assert m.head.weight.grad.abs().sum() > 0 and m.head.bias.grad.abs().sum() > 0
    assert m.pos_embed.grad is not None and m.pos_embed.requires_grad


def test_same_grid_keeps_pos_embed_and_mean_pool_without_class_token():
    m = pretrained(pool="mean", class_token=False)
    pe = m.pos_embed.detach().clone()
    vit.prepare_for_finetune(m, num_classes=3, img_size=32)
    assert torch.equal(m.pos_embed.detach(), pe)
    vit.prepare_for_finetune(m, num_classes=3, img_size=64)
    assert m.pos_embed.shape == (1, 16, 192)  # no prefix token to keep
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_bad_inputs():
    m = pretrained()
    with pytest.raises(ValueError, match="multiple of 16"):
        vit.prepare_for_finetune(m, num_classes=3, img_size=50)
    with pytest.raises(ValueError, match="num_classes must be positive"):
        vit.prepare_for_finetune(m, num_classes=0, img_size=32)
    assert m.cfg.num_classes == 21 and m.img_size == (32, 32)  # a refused surgery changes nothing
