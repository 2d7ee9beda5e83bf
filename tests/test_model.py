"""vit.model: registry, parameter counts vs timm, forward/backward, attention maps, config, FLOPs."""
from __future__ import annotations

import json

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import vit
from vit.interop import timm_kwargs

NAMES = vit.list_models()
TABLE1 = {  # name: (depth, width, mlp, heads, patch) -- paper Table 1 and DeiT Table 1
    "vit_tiny_patch16": (12, 192, 768, 3, 16), "vit_small_patch16": (12, 384, 1536, 6, 16),
    "vit_base_patch16": (12, 768, 3072, 12, 16), "vit_base_patch32": (12, 768, 3072, 12, 32),
    "vit_large_patch16": (24, 1024, 4096, 16, 16), "vit_large_patch32": (24, 1024, 4096, 16, 32),
    "vit_huge_patch14": (32, 1280, 5120, 16, 14),
}


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registry_is_table1():
    assert sorted(TABLE1) == NAMES
    for name, (depth, width, mlp, heads, patch) in TABLE1.items():
        with torch.device("meta"):
            c = vit.create_model(name, num_classes=10).cfg
        assert (c.depth, c.embed_dim, c.mlp_dim, c.num_heads, c.patch_size) == (depth, width, mlp, heads, patch)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("variant", [{}, {"pool": "mean"}, {"pool": "mean", "class_token": False}])
def test_param_count_equals_timm(name, variant):
    with torch.device("meta"):
        ours = vit.create_model(name, num_classes=1000, **variant)
        theirs = TimmViT(**timm_kwargs(ours.cfg))
    assert n_params(ours) == n_params(theirs)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


def test_vit_b16_param_count_is_known_value():
    with torch.device("meta"):
        assert n_params(vit.create_model("vit_base_patch16", num_classes=1000)) == 86_567_656


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_whole_registry(name):
    torch.manual_seed(0)
    p = TABLE1[name][4]
    m = vit.create_model(name, num_classes=5, img_size=(2 * p, 3 * p), depth=1, drop_path_rate=0.1)
    torch.nn.init.normal_(m.head.weight, std=0.02)  # the zero head would block gradients to the body
    x = torch.randn(2, 3, 2 * p, 3 * p)
    out = m(x)
    assert out.shape == (2, 5)
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 4])).backward()
    for k, prm in m.named_parameters():
        assert prm.grad is not None and torch.isfinite(prm.grad).all(), k
        assert prm.grad.abs().sum() > 0, k
    assert m.grid == (2, 3) and m.img_size == (2 * p, 3 * p) and m.patch_size == p


def test_structure_names_and_init():
    m = vit.create_model("vit_tiny_patch16", num_classes=7, img_size=32, representation_size=24)
    names = dict(m.named_parameters())
    for k in ["patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.norm1.weight",
              "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.norm2.weight",
              "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "norm.weight",
              "pre_logits.fc.weight", "head.weight"]:
        assert k in names, k
    assert names["blocks.0.attn.qkv.weight"].shape == (3 * 192, 192)
    assert names["pre_logits.fc.weight"].shape == (24, 192) and names["head.weight"].shape == (7, 24)
    assert torch.count_nonzero(m.head.weight) == 0 and torch.count_nonzero(m.head.bias) == 0
    assert m.cls_token.abs().max() < 1e-4  # normal(std 1e-6)
    assert 0.01 < m.pos_embed.std() < 0.03
    feats = m.forward_head(m.forward_features(torch.randn(2, 3, 32, 32)), pre_logits=True)
    assert feats.shape == (2, 24) and feats.abs().max() <= 1  # tanh


def test_pool_mean_averages_patch_tokens_only():
    m = vit.create_model("vit_tiny_patch16", num_classes=3, img_size=32, depth=1, pool="mean")
    tokens = torch.randn(2, 5, 192)
    assert torch.allclose(m.forward_head(tokens, pre_logits=True), tokens[:, 1:].mean(1))
    m2 = vit.create_model("vit_tiny_patch16", num_classes=3, img_size=32, depth=1, pool="mean", class_token=False)
    assert m2.cls_token is None and m2.pos_embed.shape == (1, 4, 192)
    assert m2.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 4, 192)


def test_attention_maps_are_the_attention_used():
    torch.manual_seed(0)
    m = vit.create_model("vit_tiny_patch16", num_classes=3, img_size=(32, 48), depth=2).eval()
    x = torch.randn(2, 3, 32, 48)
    maps = m.attention_maps(x)
    assert len(maps) == 2 and maps[0].shape == (2, 3, 7, 7)
    assert torch.allclose(maps[0].sum(-1), torch.ones(2, 3, 7))
    # recompute block 0's attention output from the explicit map: must equal the SDPA path
    blk = m.blocks[0]
    h = blk.norm1(m._embed(x))
    v = blk.attn._qkv(h)[2]
    manual = blk.attn.proj(torch.einsum("bhnm,bhmd->bnhd", maps[0], v).flatten(2))
    assert torch.allclose(manual, blk.attn(h), atol=1e-5)


def test_config_rebuilds_the_model():
    m = vit.create_model("vit_small_patch16", num_classes=4, img_size=(32, 64), depth=1, pool="mean",
                         representation_size=8, drop_path_rate=0.1)
    cfg = json.loads(json.dumps(m.config))
    m2 = vit.model_from_config(cfg)
    m2.load_state_dict(m.state_dict())
    m.eval(), m2.eval()
    x = torch.randn(1, 3, 32, 64)
    assert torch.equal(m(x), m2(x)) and m2.config == m.config
    with pytest.raises(ValueError, match="unknown field"):
        vit.model_from_config({**cfg, "widht": 3})


def test_flops_per_image_matches_torch_flop_counter():
    for kw in [dict(img_size=(32, 48)), dict(img_size=64, pool="mean", class_token=False, representation_size=16)]:
        m = vit.create_model("vit_tiny_patch16", num_classes=10, depth=2, **kw)
        x = torch.randn(1, 3, *m.img_size)
        # the math SDPA backend runs as bmm's, which the counter sees (the fused CPU kernel it skips)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, torch.no_grad():
            m(x)
        assert m.flops_per_image() == fc.get_total_flops()


def test_vit_b16_flops_known_value():
    with torch.device("meta"):
        m = vit.create_model("vit_base_patch16", num_classes=1000)
    assert abs(m.flops_per_image() / 2 / 1e9 - 17.58) < 0.05  # 17.6 GMACs, as fvcore/timm report


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="accepted: vit_base_patch16"):
        vit.create_model("vit_gigantic", num_classes=3)
    with pytest.raises(ValueError, match=r"225 -> use a multiple of 16, e.g. 224 or 240"):
        vit.create_model("vit_tiny_patch16", num_classes=3, img_size=225)
    with pytest.raises(ValueError, match="multiple of 16"):
        vit.create_model("vit_tiny_patch16", num_classes=3, img_size=(224, 200))
    with pytest.raises(TypeError, match="unknown override"):
        vit.create_model("vit_tiny_patch16", num_classes=3, mlp_ratio=4)
    with pytest.raises(ValueError, match="pool"):
        vit.create_model("vit_tiny_patch16", num_classes=3, pool="max")
    with pytest.raises(ValueError, match="class_token"):
        vit.create_model("vit_tiny_patch16", num_classes=3, class_token=False)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        vit.create_model("vit_tiny_patch16", num_classes=3, num_heads=5)
    m = vit.create_model("vit_tiny_patch16", num_classes=3, img_size=32, depth=1)
    with pytest.raises(ValueError, match=r"expects \(32, 32\)"):
        m(torch.randn(1, 3, 48, 48))
