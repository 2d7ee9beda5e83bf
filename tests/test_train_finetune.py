"""Fine-tuning through the same DeepSpeed loop (task=finetune): load weights, drop pre-logits, zero head,
raise the resolution, SGD + cosine; the first loss is ln K. Plus the sigmoid head's prior bias."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import timm
import torch

from pipeline.launcher import launch, make_run_config
import vit
from pipeline.objectstore import free_port
from vit.checkpoint import load_model, save_model
from vit.presets import get_preset
from vit.runs import RunFolder
from vit.train import build_optimizer, init_head_bias_from_prior, loss_fn, param_groups


def quick_pretrain(data: str, steps: int = 40) -> torch.nn.Module:
    """A digits_tiny backbone trained for a few steps in-process (the weights fine-tuning starts from)."""
    from vit.data import TrainStream, to_device

    pre = get_preset("digits_tiny")
    torch.manual_seed(0)
    model = vit.create_model(pre.model.name, num_classes=10, img_size=pre.model.img_size, **pre.model.overrides)
    stream = TrainStream(data, img_size=pre.model.img_size, global_batch_size=64, rank=0, world_size=1,
                         num_workers=0, lanes=4, augment="none")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    step, threads = 0, torch.get_num_threads()
    torch.set_num_threads(1)  # 2 OpenMP threads on a busy 2-core machine are many times slower
    while step < steps:
        for batch in stream.batches(step // stream.steps_per_epoch):
            loss = loss_fn(model(to_device(batch.images, device="cpu")), batch.targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
    torch.set_num_threads(threads)
    return model


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_finetune_digits_from_pretrained_weights(digits_shards, tmp_path):
    save_model(quick_pretrain(digits_shards), str(tmp_path / "pretrained"))
    cfg = make_run_config("digits_tiny_ft", data=digits_shards, out=str(tmp_path), run_id="ft", steps=16,
                          init_from=str(tmp_path / "pretrained"), parent="pretrain-x", master_port=free_port(),
                          sets=["launch.cpu_threads_per_rank=1"])
    result = launch(cfg, timeout=280)
    run = RunFolder(cfg.run_url)
    log = Path(result.rank_logs[0]).read_text()
    assert "first loss 2.3026 (ln K = ln 10 = 2.3026)" in log  # zero head => uniform softmax
    rows = list(csv.DictReader(open(run.metrics)))
    assert [int(r["step"]) for r in rows] == list(range(1, 17))
    assert sum(float(r["loss"]) for r in rows[-4:]) / 4 < math.log(10) - 0.3
    assert result.final["event"] == "finished" and result.final["steps"] == 16  # rank 0's status record
    tuned = load_model(run.url)
    assert tuned.config["num_classes"] == 10 and list(tuned.config["img_size"]) == [32, 32]
    assert tuned.config["representation_size"] is None  # pre-logits dropped for fine-tuning
    cfg_json = json.loads(Path(run.url, "launch", "config-node0.json").read_text())  # what the ranks were given
    assert cfg_json["optim"]["name"] == "sgd" and cfg_json["optim"]["weight_decay"] == 0.0
    # the run's timm model folder: timm's own loader gives the project's logits, with the class names
    theirs = timm.create_model(f"local-dir:{run.url}/timm", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(theirs(x), tuned.eval()(x))
    classes = json.loads((Path(digits_shards) / "manifest.json").read_text())["classes"]
    assert theirs.pretrained_cfg["label_names"] == classes


def test_sigmoid_head_bias_from_label_priors():
    model = vit.create_model("vit_tiny_patch16", num_classes=3, img_size=16, patch_size=4, embed_dim=32, depth=1,
                             num_heads=2, mlp_dim=32)
    prior = torch.tensor([0.5, 0.1, 0.01])
    init_head_bias_from_prior(model, prior)
    assert model.head.bias.tolist() == pytest.approx([0.0, math.log(0.1 / 0.9), math.log(0.01 / 0.99)], rel=1e-5)
    # with a zero head weight the initial per-class prediction equals the prior
    probs = torch.sigmoid(model(torch.randn(2, 3, 16, 16)))
    assert probs[0].tolist() == pytest.approx(prior.tolist(), rel=1e-4)
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert loss_fn(model(torch.randn(2, 3, 16, 16)), targets).item() > 0


def test_weight_decay_only_on_weight_matrices():
    model = vit.create_model("vit_tiny_patch16", num_classes=3, img_size=16, patch_size=4, embed_dim=32, depth=1,
                             num_heads=2, mlp_dim=32)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("weight") and p.ndim >= 2 for p in decay["params"])
    assert {"cls_token", "pos_embed"} <= {names[id(p)] for p in no_decay["params"]}
    opt = build_optimizer(get_preset("digits_tiny_ft"), model)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
