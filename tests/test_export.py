"""vit.export and `vitpipe export`: finished models opened by timm's own loaders
(`local-dir:`, `pretrained_cfg_overlay=dict(file=...)`, the official `.npz` loader), and
`--posemb-resample scipy_linear` checked against scipy.ndimage.zoom(order=1)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.ndimage
import timm
import torch

import vit
from pipeline.cli import main as cli_main
from vit.checkpoint import load_model, save_model
from vit.export import export_timm
from vit.runs import RunFolder

SMALL = dict(patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_dim=128)


def random_model(**kw):
    torch.manual_seed(0)
    m = vit.create_model("vit_tiny_patch16", **{"num_classes": 7, "img_size": 32, **SMALL, **kw})
    for p in m.parameters():
        p.data.normal_(0, 0.1)
    return m.eval()


def finetuned_at_new_resolution():
    """A pretrained model with a pre-logits layer, fine-tuned as the paper does: new zero head -> trained, 32 -> 48 px."""
    m = vit.prepare_for_finetune(random_model(representation_size=16), num_classes=5, img_size=48)
    torch.nn.init.normal_(m.head.weight, std=0.3)  # as if trained: a zero head would hide a wrong head
    torch.nn.init.normal_(m.head.bias, std=0.3)
    return m.eval()


CASES = {
    "finetuned_48px": finetuned_at_new_resolution,
    "pool_mean": lambda: random_model(pool="mean"),
    "pool_mean_no_class_token": lambda: random_model(pool="mean", class_token=False, img_size=(32, 48)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_timm_folder_gives_the_projects_logits_through_timms_loaders(tmp_path, case):
    ours = CASES[case]()
    folder = tmp_path / "timm"
    export_timm(ours, folder, label_names=[f"c{i}" for i in range(ours.cfg.num_classes)])
    x = torch.randn(3, 3, *ours.img_size)
    cfg = json.loads((folder / "config.json").read_text())
    assert timm.is_model(cfg["architecture"]) and cfg["num_classes"] == ours.cfg.num_classes
    with torch.no_grad():
        want = ours(x)
        by_dir = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        assert torch.equal(by_dir(x), want)
        # the folder's pretrained_cfg carries num_classes: without it timm would re-initialise the head
        overlay = dict(cfg["pretrained_cfg"], file=str(folder / "model.safetensors"))
        by_file = timm.create_model(cfg["architecture"], pretrained=True, num_classes=cfg["num_classes"],
                                    pretrained_cfg_overlay=overlay, **cfg["model_args"]).eval()
        assert torch.equal(by_file(x), want)
    assert by_dir.pretrained_cfg["label_names"] == [f"c{i}" for i in range(ours.cfg.num_classes)]
    assert tuple(by_dir.pretrained_cfg["input_size"]) == (3, *ours.img_size)


def test_pre_logits_model_exports_features_only_and_says_so(tmp_path):
    ours = random_model(representation_size=16)  # a pretraining model: pooled -> Linear+tanh -> head
    export_timm(ours, tmp_path / "timm")
    cfg = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert cfg["num_classes"] == 0 and cfg["vitpipe"]["features_only"]
    assert cfg["vitpipe"]["dropped"] == ["pre_logits.fc (Linear 64->16 + tanh)", "head (Linear 16->7)"]
    assert "features-only" in cfg["pretrained_cfg"]["notes"][0]
    theirs = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = ours.forward_features(x)[:, 0]  # the pre-logits layer's input
        assert torch.equal(theirs(x), pooled)
        assert not torch.allclose(ours.forward_head(ours.forward_features(x), pre_logits=True)[:, :16], pooled[:, :16])


def complete_run(root, model, run_id="finetune-20261201-000000-abcdef"):
    run = RunFolder.create(str(root), run_id)
    run.start(kind="finetune")
    save_model(model, run.url)
    run.finish(status="complete")
    return run


def test_vitpipe_export_npz_opens_with_timms_own_npz_loader(tmp_path, capsys):
    ours = finetuned_at_new_resolution()
    run = complete_run(tmp_path, ours)
    assert cli_main(["export", run.run_id, "--root", str(tmp_path), "--to", "npz", str(tmp_path / "npz")]) == 0
    assert cli_main(["export", "latest:finetune", "--root", str(tmp_path), "--to", "timm", str(tmp_path / "t")]) == 0
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    overlay = dict(cfg["pretrained_cfg"], file=str(tmp_path / "npz" / "model.npz"), custom_load=True)
    theirs = timm.create_model(cfg["architecture"], pretrained=True, num_classes=cfg["num_classes"],
                               pretrained_cfg_overlay=overlay, **cfg["model_args"]).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(theirs(x), ours(x), atol=1e-5)
    assert cli_main(["export", run.url, "--to", "safetensors", str(tmp_path / "st")]) == 0
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "st").eval()(x), ours(x))
    assert "model.npz" in capsys.readouterr().out


def test_vitpipe_export_refuses_unfinished_runs_in_one_line(tmp_path, capsys):
    run = RunFolder.create(str(tmp_path), "finetune-20261201-000000-000000")
    run.start(kind="finetune")
    assert cli_main(["export", run.url, "--to", "timm", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not complete" in err and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- posemb resampling


def scipy_zoom_posemb(pe: torch.Tensor, old: int, new: int) -> np.ndarray:
    """The official code: scipy.ndimage.zoom(order=1) of the [gs, gs, D] grid."""
    grid = pe[0, 1:].reshape(old, old, -1).double().numpy()
    return scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1).reshape(new * new, -1)


@pytest.mark.parametrize("mode", ["scipy_linear", "bicubic"])
def test_finetune_posemb_resample_config_key(tmp_path, mode):
    from pipeline.launcher import make_run_config
    from vit.train import build_model

    pre = random_model(num_classes=10, img_size=32)  # grid 4x4
    save_model(pre, tmp_path / "pre")
    cfg = make_run_config("digits_tiny_ft", data=str(tmp_path / "d"), out=str(tmp_path), run_id="ft",
                          init_from=str(tmp_path / "pre"),
                          sets=[f"model.posemb_resample={mode}", "model.img_size=56"])
    model = build_model(cfg, num_classes=3)
    assert model.grid == (7, 7)
    got = model.pos_embed.detach()[0, 1:].double().numpy()
    want = scipy_zoom_posemb(pre.pos_embed.detach(), 4, 7)
    assert np.allclose(got, want, atol=1e-6) == (mode == "scipy_linear")


def test_finetune_cli_has_posemb_resample_and_bad_values_are_refused():
    from pipeline.cli import build_parser
    from vit.config import ConfigError, ModelConfig

    args = build_parser().parse_args(["finetune", "--preset", "digits_tiny_ft", "--pretrained", "x", "--data", "d",
                                      "--out", "o", "--posemb-resample", "scipy_linear"])
    assert args.posemb_resample == "scipy_linear"
    with pytest.raises(ConfigError, match="model.posemb_resample='nearest' is not one of"):
        ModelConfig(name="vit_tiny_patch16", img_size=32, posemb_resample="nearest")
