"""vit.budget: the projection arithmetic against counted oracles (FlopCounterMode; the issue's figures)
and the `--check` decode warning. Activation bytes are checked against saved_tensors_hooks counts in
tests/test_train_step.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import vit
from pipeline.cli import main
from vit import budget
from vit.presets import get_preset


def counted_train_flops(model, x) -> int:
    y = torch.zeros(len(x), dtype=torch.long)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:  # the math SDPA is counted
        F.cross_entropy(model(x), y).backward()
    return fc.get_total_flops()


def test_train_flops_match_the_flop_counter():
    m = vit.create_model("vit_tiny_patch16", num_classes=10, depth=2, img_size=(32, 48), representation_size=16)
    x = torch.randn(2, 3, 32, 48)
    c = m.cfg
    # backward of the patch-embedding conv needs no input gradient (the image): 1x its forward, not 2x
    conv = 2 * c.grid[0] * c.grid[1] * c.in_chans * c.patch_size**2 * c.embed_dim
    plain = counted_train_flops(m, x) / len(x)
    assert plain == budget.train_flops_per_image(m.cfg) - conv
    m.set_grad_checkpointing()
    recompute = counted_train_flops(m, x) / len(x) - plain
    # the counter sees the recomputed attention and MLP but not the recomputed qkv / proj matmuls, so the
    # budget's extra forward of every block is an upper bound of what it counts
    assert 0.6 * c.depth * c.flops_per_block() < recompute <= c.depth * c.flops_per_block()


def test_vit_b16_figures_of_the_issue():
    m = vit.model.model_config("vit_base_patch16", num_classes=1000)  # arithmetic only: no weights
    assert budget.train_flops_per_image(m) / 1e9 == pytest.approx(105.6, rel=0.005)
    assert budget.DEFAULT_MFU == pytest.approx(0.32, abs=0.001)  # 3,000 img/s x 105.6 GFLOP / 989.4 TFLOP/s
    assert budget.projected_images_per_sec(m) == pytest.approx(3000, rel=0.005)
    assert budget.train_flops_per_image(m, grad_checkpointing=True) / budget.train_flops_per_image(m) == \
        pytest.approx(4 / 3, rel=0.01)


def test_state_bytes_per_zero_stage():
    n, w = 1000, 8
    totals = [sum(budget.state_bytes(n, zero_stage=s, world_size=w).values()) for s in range(4)]
    assert totals == [16 * n, 8 * n + 12 * n / w, 4 * n + 16 * n / w, 20 * n / w]
    assert sum(budget.state_bytes(n, zero_stage=0, world_size=w, optimizer="sgd").values()) == 12 * n
    with pytest.raises(ValueError, match="zero_stage=4"):
        budget.state_bytes(n, zero_stage=4, world_size=w)


def test_fit_memory_picks_the_cheapest_setting_that_fits():
    with torch.device("meta"):
        h14 = vit.create_model("vit_huge_patch14", num_classes=1000)
    small = budget.fit_memory(h14, micro_batch=32, world_size=8)
    assert (small.zero_stage, small.grad_checkpointing) == (0, False)
    whole = budget.fit_memory(h14, micro_batch=512, world_size=8)  # 4096 / 8 ranks in one micro-step
    assert whole.grad_checkpointing and whole.bytes <= budget.H100_MEMORY * budget.USABLE_MEMORY_SHARE
    too_much = budget.fit_memory(h14, micro_batch=4096, world_size=8)
    assert too_much.zero_stage is None and too_much.bytes > budget.H100_MEMORY


def test_decode_warning_figures():
    cfg = get_preset("i21k_vit_b16")
    cfg.data.num_workers = 2
    line = budget.decode_warning(cfg)
    assert "2 worker(s) per rank x 750 img/s per core = 1500 img/s < 3006 img/s per H100" in line
    assert "data.num_workers=5" in line and "\n" not in line
    cfg.data.num_workers = 5
    assert budget.decode_warning(cfg) is None  # 3750 >= 3006
    assert budget.decode_warning(cfg, per_core=400) is not None


def test_check_prints_the_warning(capsys):
    args = ["pretrain", "--preset", "i21k_vit_b16", "--data", "s3://b/d", "--out", "s3://b", "--run-id", "r",
            "--nproc", "8", "--nnodes", "4", "--check"]
    assert main([*args, "--set", "data.num_workers=2"]) == 0
    err = capsys.readouterr().err
    assert "decode is projected below the GPU step rate: 2 worker(s) per rank" in err
    assert main([*args, "--set", "data.num_workers=8"]) == 0
    assert "decode is projected" not in capsys.readouterr().err
