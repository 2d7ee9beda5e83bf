"""vit.interop: timm state dicts both ways, Google .npz both ways (checked against timm's own npz loader)."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT

import vit
from vit.interop import load_big_vision_npz, save_big_vision_npz, timm_kwargs

VARIANTS = [{}, {"pool": "mean"}, {"pool": "mean", "class_token": False}]


def random_model(name="vit_tiny_patch16", **kw):
    torch.manual_seed(0)
    kw = {"num_classes": 7, "img_size": (32, 48), "depth": 2, **kw}
    m = vit.create_model(name, **kw)
    for p in m.parameters():
        p.data.normal_(0, 0.1)
    return m.eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_timm_round_trip_same_logits(variant):
    m = random_model(**variant)
    theirs = TimmViT(**timm_kwargs(m.cfg)).eval()
    theirs.load_state_dict(vit.to_timm_state_dict(m), strict=True)
    x = torch.randn(3, 3, 32, 48)
    with torch.no_grad():
        ref = theirs(x)
        assert torch.allclose(m(x), ref, atol=1e-4)
        back = vit.from_timm_state_dict(theirs.state_dict(), "vit_tiny_patch16", checkpoint_img_size=(32, 48),
                                        pool=m.cfg.pool).eval()
        assert torch.allclose(back(x), ref, atol=1e-4)
    assert back.config == m.config


def test_from_timm_infers_architecture_and_resamples(caplog):
    torch.manual_seed(0)
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32).eval()
    with caplog.at_level(logging.INFO):
        m = vit.from_timm_state_dict(theirs.state_dict(), img_size=64).eval()
    assert m.cfg.name == "vit_tiny_patch16" and m.cfg.num_heads == 3 and m.cfg.num_classes == 5
    assert m.img_size == (64, 64) and "grid (2, 2) -> (4, 4)" in caplog.text
    expected = vit.resample_pos_embed(theirs.pos_embed.detach(), (4, 4))
    assert torch.equal(m.pos_embed.detach(), expected)
    theirs64 = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=64,
                                 weight_init="skip").eval()  # every weight is loaded below
    sd = theirs.state_dict()
    sd["pos_embed"] = expected
    theirs64.load_state_dict(sd)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(m(x), theirs64(x), atol=1e-4)


def test_refuses_what_timm_cannot_hold_and_foreign_state_dicts():
    with pytest.raises(ValueError, match="no pre-logits layer"):
        vit.to_timm_state_dict(random_model(representation_size=8))
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=3)
    with pytest.raises(ValueError, match=r"not a ViT state dict .*conv1\.weight"):
        vit.from_timm_state_dict(resnet.state_dict(), "vit_tiny_patch16")
    reg = TimmViT(img_size=32, patch_size=16, embed_dim=192, depth=2, num_heads=3, num_classes=3, reg_tokens=1)
    with pytest.raises(ValueError, match="unexpected keys: reg_token"):
        vit.from_timm_state_dict(reg.state_dict(), "vit_tiny_patch16", checkpoint_img_size=32)
    fcn = TimmViT(img_size=32, patch_size=16, embed_dim=192, depth=2, num_heads=3, num_classes=3,
                  global_pool="avg")
    with pytest.raises(ValueError, match="fc_norm"):
        vit.from_timm_state_dict(fcn.state_dict(), "vit_tiny_patch16")
    sd = random_model().state_dict()
    del sd["blocks.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"missing keys: blocks\.1\.mlp\.fc2\.bias"):
        vit.from_timm_state_dict(sd, "vit_tiny_patch16", checkpoint_img_size=(32, 48))


# ----------------------------------------------------------------------------- .npz


def official_npz(path, *, depth=2, d=64, heads=4, mlp=128, patch=8, grid=3, classes=5, seed=0, rep=None):
    """A checkpoint in google-research/vision_transformer's layout, written with numpy only."""
    rng = np.random.default_rng(seed)
    hd = d // heads

    def r(*shape):
        return rng.normal(0, 0.2, shape).astype(np.float32)

    w = {"embedding/kernel": r(patch, patch, 3, d), "embedding/bias": r(d), "cls": r(1, 1, d),
         "Transformer/posembed_input/pos_embedding": r(1, 1 + grid * grid, d),
         "Transformer/encoder_norm/scale": 1 + r(d), "Transformer/encoder_norm/bias": r(d),
         "head/kernel": r(rep or d, classes), "head/bias": r(classes)}
    if rep:
        w |= {"pre_logits/kernel": r(d, rep), "pre_logits/bias": r(rep)}
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        a = b + "MultiHeadDotProductAttention_1/"
        for n in ("query", "key", "value"):
            w[a + f"{n}/kernel"], w[a + f"{n}/bias"] = r(d, heads, hd), r(heads, hd)
        w |= {a + "out/kernel": r(heads, hd, d), a + "out/bias": r(d),
              b + "LayerNorm_0/scale": 1 + r(d), b + "LayerNorm_0/bias": r(d),
              b + "LayerNorm_2/scale": 1 + r(d), b + "LayerNorm_2/bias": r(d),
              b + "MlpBlock_3/Dense_0/kernel": r(d, mlp), b + "MlpBlock_3/Dense_0/bias": r(mlp),
              b + "MlpBlock_3/Dense_1/kernel": r(mlp, d), b + "MlpBlock_3/Dense_1/bias": r(d)}
    np.savez(path, **w)
    return w


def test_npz_written_with_numpy_gives_timm_logits(tmp_path):
    f = tmp_path / "official.npz"
    official_npz(f)
    ours = load_big_vision_npz(f).eval()
    c = ours.cfg
    assert (c.patch_size, c.embed_dim, c.depth, c.num_heads, c.mlp_dim, c.num_classes, c.img_size) == \
        (8, 64, 2, 4, 128, 5, (24, 24))
    ref = TimmViT(**timm_kwargs(c)).eval()
    ref.load_pretrained(str(f))  # timm's own loader of the official .npz layout
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), atol=1e-4)


def test_npz_big_vision_layout_reads_the_same(tmp_path):
    w = official_npz(tmp_path / "official.npz")
    bv = {}
    for k, v in w.items():
        k = (k.replace("Transformer/posembed_input/pos_embedding", "pos_embedding")
             .replace("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0")
             .replace("LayerNorm_2", "LayerNorm_1").replace("MlpBlock_3", "MlpBlock_0"))
        bv["params/" + k] = v
    np.savez(tmp_path / "bv.npz", **bv)
    a, b = load_big_vision_npz(tmp_path / "official.npz"), load_big_vision_npz(tmp_path / "bv.npz")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


@pytest.mark.parametrize("variant", [{}, {"representation_size": 16}, {"pool": "mean", "class_token": False}])
def test_npz_round_trip(tmp_path, variant):
    m = random_model(**variant)
    save_big_vision_npz(m, tmp_path / "m.npz")
    keys = set(np.load(tmp_path / "m.npz").files)
    assert "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel" in keys
    assert ("pre_logits/kernel" in keys) == bool(variant.get("representation_size"))
    back = load_big_vision_npz(tmp_path / "m.npz", checkpoint_img_size=(32, 48), pool=m.cfg.pool).eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        assert torch.allclose(back(x), m(x), atol=1e-5)
    assert {**back.config, "name": None} == {**m.config, "name": None}


def test_npz_resampled_on_load_with_mode(tmp_path, caplog):
    w = official_npz(tmp_path / "o.npz", grid=3)
    with caplog.at_level(logging.INFO):
        m = load_big_vision_npz(tmp_path / "o.npz", img_size=40, mode="scipy_linear")
    assert m.grid == (5, 5) and "grid (3, 3) -> (5, 5)" in caplog.text
    pe = torch.from_numpy(w["Transformer/posembed_input/pos_embedding"])
    assert torch.equal(m.pos_embed.detach(), vit.resample_pos_embed(pe, (5, 5), mode="scipy_linear"))


def test_npz_bad_inputs(tmp_path):
    w = official_npz(tmp_path / "o.npz")
    del w["Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"]
    np.savez(tmp_path / "broken.npz", **w)
    with pytest.raises(ValueError, match=r"broken\.npz: missing key 'Transformer/encoderblock_1/MlpBlock_3"):
        load_big_vision_npz(tmp_path / "broken.npz")
    np.savez(tmp_path / "other.npz", conv1=np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="no 'embedding/kernel'"):
        load_big_vision_npz(tmp_path / "other.npz")
