"""vit.checkpoint: save_model / load_model over every accepted source; strict and safe."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import vit
from vit.checkpoint import CheckpointError, load_model, save_model
from vit.interop import save_big_vision_npz


def trained(**kw):
    torch.manual_seed(0)
    m = vit.create_model("vit_tiny_patch16", num_classes=6, img_size=32, depth=2, **kw)
    for p in m.parameters():
        p.data.normal_(0, 0.05)
    return m.eval()


def same_logits(a, b, size=32):
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-5)


def test_save_load_local_round_trip(tmp_path):
    m = trained(representation_size=16, pool="mean")
    save_model(m, tmp_path / "run")
    assert sorted(os.listdir(tmp_path / "run")) == ["model.safetensors", "model_config.json"]
    assert json.loads((tmp_path / "run" / "model_config.json").read_text()) == m.config
    assert set(load_file(tmp_path / "run" / "model.safetensors")) == set(m.state_dict())
    back = load_model(tmp_path / "run")
    assert back.config == m.config and same_logits(back, m)


def test_load_adapts_img_size_and_classes_on_purpose(tmp_path, caplog):
    m = trained()
    save_model(m, tmp_path / "run")
    with caplog.at_level(logging.INFO):
        big = load_model(tmp_path / "run", img_size=64, mode="bilinear")
    assert big.img_size == (64, 64) and "grid (2, 2) -> (4, 4)" in caplog.text and "mode=bilinear" in caplog.text
    assert torch.equal(big.pos_embed.detach(),
                       vit.resample_pos_embed(m.pos_embed.detach(), (4, 4), mode="bilinear"))
    ft = load_model(tmp_path / "run", num_classes=3)
    assert ft.cfg.num_classes == 3 and torch.count_nonzero(ft.head.weight) == 0


def test_load_timm_pth_safetensors_and_npz(tmp_path):
    m = trained()
    torch.save({"state_dict": vit.to_timm_state_dict(m)}, tmp_path / "w.pth")
    save_file(vit.to_timm_state_dict(m), tmp_path / "w.safetensors")
    save_big_vision_npz(m, tmp_path / "w.npz")
    for f in ("w.pth", "w.safetensors", "w.npz"):
        back = load_model(tmp_path / f, name="vit_tiny_patch16")
        assert same_logits(back, m), f
        assert back.config == m.config, f


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file: code execution
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"pos_embed": torch.zeros(1), "evil": _Payload(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"evil\.pth: refused to unpickle"):
        load_model(tmp_path / "evil.pth", name="vit_tiny_patch16")
    assert not marker.exists()


def test_strict_and_clear_errors(tmp_path):
    m = trained()
    save_model(m, tmp_path / "run")
    sd = load_file(tmp_path / "run" / "model.safetensors")
    sd.pop("blocks.0.attn.qkv.bias")
    sd["blocks.0.extra"] = torch.zeros(1)
    save_file(sd, tmp_path / "run" / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys: blocks\.0\.attn\.qkv\.bias; unexpected keys: blocks\.0\.extra"):
        load_model(tmp_path / "run")
    with pytest.raises(CheckpointError, match="no model_config.json"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_config.json").write_text(json.dumps(m.config))
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_model(tmp_path / "half")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="no state dict of tensors"):
        load_model(tmp_path / "list.pth")
    np.savez(tmp_path / "x.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="embedding/kernel"):
        load_model(tmp_path / "x.npz")


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_save_load_s3(s3):
    m = trained()
    url = s3.url("checkpoint-test/run-1")
    save_model(m, url)
    back = load_model(url, img_size=48)
    assert back.grid == (3, 3)
    assert torch.equal(back.pos_embed.detach(), vit.resample_pos_embed(m.pos_embed.detach(), (3, 3)))
    save_big_vision_npz(m, s3.url("checkpoint-test/m.npz"))
    assert same_logits(load_model(s3.url("checkpoint-test/m.npz")), m)
