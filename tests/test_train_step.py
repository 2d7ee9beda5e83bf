"""The training-step switches (issue 18 item 4) on CPU: each gives the loss and gradients of the plain step.

bf16 autocast (launch.precision=bf16), fused AdamW, torch.compile (model.compile) and per-block activation
checkpointing (model.grad_checkpointing); the last one also saves fewer bytes for backward, counted with
saved_tensors_hooks. One integration test runs the switches through `vitpipe pretrain --set` on a real
DeepSpeed CPU rank. The CUDA kernels behind them (flash SDPA, fused CUDA AdamW) are unverified here.
"""
from __future__ import annotations

import csv
import glob
import os

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks

import vit
from pipeline.objectstore import free_port
from vit import budget
from vit.config import apply_overrides, deepspeed_config
from vit.presets import get_preset
from vit.train import build_optimizer


def tiny(**kw) -> vit.VisionTransformer:
    torch.manual_seed(0)
    m = vit.create_model("vit_tiny_patch16", num_classes=10, depth=3, img_size=64, drop_path_rate=0.1, **kw)
    torch.nn.init.normal_(m.head.weight, std=0.2)  # the zero head would give ln K whatever the blocks do
    return m.train()


def batch(n: int = 8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 64, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


def loss_and_grads(model, x, y, *, autocast: bool = False):
    torch.manual_seed(2)  # the same drop-path masks in both runs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_grads_close(a: dict, b: dict, *, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def saved_bytes(model, x, *, autocast: bool = False) -> int:
    """Bytes of the distinct tensors autograd saves for backward, not counting the parameters."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(x)
    return sum(seen.values())


def test_grad_checkpointing_same_loss_and_gradients():
    x, y = batch()
    plain, ckpt = tiny(), tiny()
    ckpt.set_grad_checkpointing()
    l0, g0 = loss_and_grads(plain, x, y)
    l1, g1 = loss_and_grads(ckpt, x, y)
    assert l1 == pytest.approx(l0, rel=1e-6)
    assert_grads_close(g1, g0, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # eval / no-grad forward skips the checkpoint wrapper and gives the same output
        torch.testing.assert_close(ckpt.eval()(x), plain.eval()(x))


@pytest.mark.parametrize("autocast", [False, True])
def test_grad_checkpointing_saves_what_the_budget_says(autocast):
    x, _ = batch()
    m = tiny()
    precision = "bf16" if autocast else "fp32"
    full = saved_bytes(m, x, autocast=autocast)
    m.set_grad_checkpointing()
    kept = saved_bytes(m, x, autocast=autocast)
    want_full = budget.activation_bytes(m, len(x), precision=precision)["saved"]
    want_kept = budget.activation_bytes(m, len(x), grad_checkpointing=True, precision=precision)["saved"]
    assert full == pytest.approx(want_full, rel=0.03)  # counted tensor by tensor vs the formula
    assert kept == pytest.approx(want_kept, rel=0.03)
    assert kept < full / 4  # 3 blocks at 64 px: each keeps 4D bytes per token of its 36-64D


def test_bf16_autocast_loss_and_gradients_within_tolerance():
    x, y = batch()
    m = tiny()
    l32, g32 = loss_and_grads(m, x, y)
    m.zero_grad(set_to_none=True)
    l16, g16 = loss_and_grads(m, x, y, autocast=True)
    assert all(p.dtype == torch.float32 for p in m.parameters())  # autocast: weights and gradients stay fp32
    assert all(g.dtype == torch.float32 for g in g16.values())
    assert l16 == pytest.approx(l32, rel=2e-2) and l16 != l32  # bf16 matmuls ran, close to fp32
    cos = F.cosine_similarity(torch.cat([g.flatten() for g in g16.values()]),
                              torch.cat([g.flatten() for g in g32.values()]), dim=0)
    assert cos > 0.99


def test_fused_adamw_steps_like_foreach():
    cfg = get_preset("digits_tiny")
    x, y = batch()
    a, b = tiny(), tiny()
    opt_a, opt_b = build_optimizer(cfg, a, fused=True), build_optimizer(cfg, b, fused=False)
    assert opt_a.defaults["fused"] and not opt_b.defaults["fused"]
    losses = {"fused": [], "foreach": []}
    for _ in range(4):
        for key, m, opt in (("fused", a, opt_a), ("foreach", b, opt_b)):
            opt.zero_grad(set_to_none=True)
            losses[key].append(loss_and_grads(m, x, y)[0])
            opt.step()
    assert losses["fused"] == pytest.approx(losses["foreach"], rel=1e-5)
    assert losses["fused"][-1] < losses["fused"][0] - 0.1
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if name.endswith("qkv.bias"):  # the key bias gets a zero gradient (softmax ignores it): Adam turns
            continue  # its rounding noise into full-size steps, differently in each kernel
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_compile_same_loss_and_gradients():
    x, y = batch()
    eager, compiled = tiny(), tiny()
    compiled.set_grad_checkpointing()
    compiled.compile()  # what engine.compile() does to engine.module: in place, state-dict keys unchanged
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    l0, g0 = loss_and_grads(eager, x, y)
    l1, g1 = loss_and_grads(compiled, x, y)
    assert l1 == pytest.approx(l0, rel=1e-5)
    assert_grads_close(g1, g0, rtol=1e-4, atol=1e-5)


def test_switches_in_the_config():
    cfg = apply_overrides(get_preset("digits_tiny"), ["model.compile=true", "model.grad_checkpointing=true",
                                                      "launch.precision=bf16"])
    assert cfg.model.compile is True and cfg.model.grad_checkpointing is True
    ds = deepspeed_config(cfg, accelerator="cpu")  # bf16 is torch autocast inside the engine, also on CPU
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in ds
    with pytest.raises(Exception, match="model.compile='yes' must be true or false"):
        apply_overrides(get_preset("digits_tiny"), ["model.compile=yes"])
    with pytest.raises(Exception, match="fp16 needs a GPU"):
        get_preset("digits_tiny").launch.__class__(precision="fp16").resolved_precision("cpu")
    assert get_preset("digits_tiny").optim.fused is None  # fused AdamW on CUDA only, unless set
    assert apply_overrides(get_preset("digits_tiny"), ["optim.fused=true"]).optim.fused is True
    with pytest.raises(Exception, match="optim.fused='yes' must be true, false or null"):
        apply_overrides(get_preset("digits_tiny"), ["optim.fused=yes"])


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_switches_reach_a_deepspeed_run(digits_shards, tmp_path, capsys):
    """`vitpipe pretrain --set model.compile=true --set model.grad_checkpointing=true --set
    launch.precision=bf16` on one CPU rank: the engine compiles, trains, and its losses follow the plain run's."""
    from pipeline.cli import main

    def run(run_id: str, *sets: str) -> list[float]:
        args = ["pretrain", "--preset", "digits_tiny", "--data", digits_shards, "--out", str(tmp_path),
                "--run-id", run_id, "--nproc", "1", "--steps", "6", "--master-port", str(free_port()),
                "--set", "launch.cpu_threads_per_rank=1"]
        assert main(args + [x for s in sets for x in ("--set", s)]) == 0
        with open(tmp_path / "runs" / run_id / "metrics.csv", newline="") as f:
            return [float(r["loss"]) for r in csv.DictReader(f)]

    plain = run("plain")
    switched = run("switched", "model.compile=true", "model.grad_checkpointing=true", "launch.precision=bf16",
                   "optim.fused=true")
    capsys.readouterr()
    logs = "".join(open(p).read() for p in glob.glob(str(tmp_path / "runs" / "switched" / "logs" / "**" / "*.log"),
                                                     recursive=True))
    assert "step: precision bf16, compiled True, grad checkpointing True," in logs and "fused True" in logs
    assert len(switched) == len(plain) == 6
    assert switched == pytest.approx(plain, rel=3e-2)  # bf16 autocast: close to the fp32 losses, not equal
    assert switched != plain
    assert os.path.exists(tmp_path / "runs" / "switched" / "model.safetensors")  # saved from the compiled module


def test_logged_mfu_takes_the_peak_of_the_gpu_it_runs_on():
    """H100 dense bf16 is the budget's figure (one number for the projection and the logged MFU);
    GPUs the table does not name get the A100's."""
    from vit.train import gpu_peak_flops

    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == budget.H100_BF16_PEAK == 989.4e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert gpu_peak_flops("Tesla V100-SXM2-16GB", "fp16") == 312e12
