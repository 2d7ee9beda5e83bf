"""vit.fewshot: the closed-form ridge against scikit-learn's, shot drawing, the CLI's bad input.

The digits pretraining's few-shot accuracy (during training and through `vitpipe evaluate
--fewshot`) is tested in tests/test_finetune.py, on the pretraining run made there.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vit.fewshot import draw_shots, extract_features, fewshot_accuracy, parse_shots, pm1_targets, ridge_fit


@pytest.fixture(scope="module")
def digits_features(tmp_path_factory) -> dict:
    """Pre-logits features of the digits_tiny model (random weights) on the digits val split."""
    import vit
    from shards import shard_dataset
    from shards.digits import write_digits_tree
    from vit.presets import get_preset

    root = tmp_path_factory.mktemp("fewshot")
    write_digits_tree(root / "tree", split="val", size=16)
    shard_dataset(str(root / "tree"), str(root / "ds"), name="digits_val", shard_size=100, seed=0)
    cfg = get_preset("digits_tiny").model
    torch.manual_seed(0)
    model = vit.create_model(cfg.name, num_classes=10, img_size=cfg.img_size, **cfg.overrides)
    x, y = extract_features(model, str(root / "ds"))
    return {"x": x, "y": y, "url": str(root / "ds"), "model": model}


@pytest.mark.parametrize("shots", [1, 5, 25])
@pytest.mark.parametrize("l2", [0.1, 1.0, 100.0])
def test_ridge_equals_scikit_learn_ridge_on_pm1_targets(digits_features, shots, l2):
    from sklearn.linear_model import Ridge

    x, y = digits_features["x"], digits_features["y"]
    idx = draw_shots(y, shots=shots, rng=np.random.default_rng(shots))
    targets = pm1_targets(y[idx], 10)
    w, b = ridge_fit(x[idx], targets, l2=l2)
    ref = Ridge(alpha=l2, fit_intercept=True, solver="cholesky").fit(x[idx].astype(np.float64), targets)
    np.testing.assert_allclose(w, ref.coef_.T, atol=1e-4, rtol=0)
    np.testing.assert_allclose(b, ref.intercept_, atol=1e-4, rtol=0)
    np.testing.assert_allclose(x @ w + b, ref.predict(x.astype(np.float64)), atol=1e-4, rtol=0)


def test_features_are_the_pre_logits_output(digits_features):
    x, y = digits_features["x"], digits_features["y"]
    model = digits_features["model"]
    assert x.shape == (len(y), model.cfg.representation_size) and np.abs(x).max() <= 1.0  # tanh of the pre-logits layer
    assert sorted(np.unique(y)) == list(range(10))


def test_draws_take_k_distinct_images_per_class_and_differ_between_draws(digits_features):
    y = digits_features["y"]
    a = draw_shots(y, shots=5, rng=np.random.default_rng([0, 5, 0]))
    b = draw_shots(y, shots=5, rng=np.random.default_rng([0, 5, 1]))
    assert len(set(a.tolist())) == 50 and np.bincount(y[a]).tolist() == [5] * 10
    assert set(a.tolist()) != set(b.tolist())
    accs = fewshot_accuracy(digits_features["x"], y, digits_features["x"], y, shots=5, l2=1.0, draws=3)
    assert len(accs) == 3 and all(0 < a <= 1 for a in accs)
    assert accs == fewshot_accuracy(digits_features["x"], y, digits_features["x"], y, shots=5, l2=1.0, draws=3)


def test_too_few_images_per_class_names_the_fix():
    with pytest.raises(ValueError, match=r"10-shot evaluation needs 10 images of class 1; the training set has 3"):
        draw_shots(np.array([0] * 20 + [1] * 3), shots=10, rng=np.random.default_rng(0))


@pytest.mark.parametrize("text", ["", "a,b", "0,5", "-1"])
def test_bad_shot_list_is_one_line(text):
    with pytest.raises(ValueError, match=r"--fewshot .*give positive shot counts"):
        parse_shots(text)
    assert parse_shots("1, 5,10,25") == [1, 5, 10, 25]


def test_cli_fewshot_needs_val_data(digits_features, tmp_path, capsys):
    from pipeline.cli import main
    from vit.checkpoint import save_model

    save_model(digits_features["model"], str(tmp_path / "m"))
    assert main(["evaluate", str(tmp_path / "m"), "--fewshot", "1,5", "--data", digits_features["url"]]) == 2  # bad input
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--fewshot needs --val-data" in err
    assert main(["evaluate", str(tmp_path / "m"), "--fewshot", "5,x", "--data", digits_features["url"],
                 "--val-data", digits_features["url"]]) == 2
    assert "--fewshot '5,x'" in capsys.readouterr().err


def test_fewshot_config_names_what_is_missing():
    from vit.config import ConfigError, apply_overrides
    from vit.presets import get_preset

    with pytest.raises(ConfigError, match=r"fewshot.every_steps is set but fewshot.data / fewshot.val_data is empty"):
        apply_overrides(get_preset("digits_tiny"), ["fewshot.every_steps=50"])
    with pytest.raises(ConfigError, match=r"ZeRO-3 partitions; use launch.zero_stage <= 2"):
        apply_overrides(get_preset("digits_tiny"), ["fewshot.every_steps=50", 'fewshot.data="a"', 'fewshot.val_data="b"',
                                                    "launch.zero_stage=3"])
