"""vit.evaluate: metrics against hand-computed cases and sklearn, the report, the eval loop."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from vit.evaluate import (
    average_precision,
    confusion_matrix,
    mean_average_precision,
    per_class_accuracy,
    topk_correct,
    write_eval_report,
)

# --------------------------------------------------------------------------- top-k


def test_topk_hand_case():
    # 3 samples, 6 classes. Ranking of sample 0: 5 > 4 > 3 > 2 > 1 > 0.
    logits = torch.tensor(
        [
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # true 5 -> top1 hit
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # true 1 -> rank 5 -> top5 hit, not top1
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # true 0 -> rank 6 -> miss both
        ]
    )
    targets = torch.tensor([5, 1, 0])
    assert topk_correct(logits, targets, ks=(1, 2, 5, 6)) == {1: 1, 2: 1, 5: 2, 6: 3}


def test_topk_ties_break_like_argmax():
    # a zero head gives all-equal logits: top-1 must be class 0, as the confusion matrix (argmax) says
    logits = torch.zeros(4, 6)
    assert topk_correct(logits, torch.tensor([0, 0, 1, 5]), ks=(1, 2)) == {1: 2, 2: 3}


def test_topk_fewer_classes_than_k_counts_all():
    logits = torch.randn(4, 3)
    assert topk_correct(logits, torch.tensor([0, 1, 2, 0]), ks=(5,)) == {5: 4}


def test_topk_rejects_bad_shapes():
    with pytest.raises(ValueError, match="logits"):
        topk_correct(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))


# ------------------------------------------------------------------ confusion / per-class


def test_confusion_and_per_class_accuracy():
    targets = np.array([0, 0, 1, 1, 1, 2])
    preds = np.array([0, 1, 1, 1, 0, 2])
    c = confusion_matrix(preds, targets, 4)
    assert c.tolist() == [[1, 1, 0, 0], [1, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    acc = per_class_accuracy(c)
    assert acc[:3].tolist() == [0.5, 2 / 3, 1.0]
    assert math.isnan(acc[3])  # class with no samples


# ------------------------------------------------------------------------------- mAP


def test_ap_hand_case():
    # one class; ranking by score: P N P N  -> precision at the positives 1/1 and 2/3
    scores = np.array([[0.9], [0.8], [0.7], [0.1]])
    targets = np.array([[1], [0], [1], [0]])
    assert average_precision(scores, targets)[0] == pytest.approx((1.0 + 2 / 3) / 2)


def test_ap_ties_form_one_threshold():
    # two tied scores, one positive one negative, then a positive: sklearn semantics
    scores = np.array([[0.5], [0.5], [0.2]])
    targets = np.array([[1], [0], [1]])
    # thresholds: 0.5 -> P=1/2, R=1/2 ; 0.2 -> P=2/3, R=1  => AP = 0.5*0.5 + 0.5*2/3
    assert average_precision(scores, targets)[0] == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)


def test_map_matches_sklearn_and_skips_classes_without_positives():
    rng = np.random.default_rng(0)
    n, k = 200, 7
    targets = (rng.random((n, k)) < 0.3).astype(int)
    targets[:, 6] = 0  # a class with no positive: excluded from the mean
    scores = targets * 0.7 + rng.normal(size=(n, k))
    scores[:40, 2] = np.round(scores[:40, 2], 1)  # some ties
    ap = average_precision(scores, targets)
    assert math.isnan(ap[6])
    for c in range(6):
        assert ap[c] == pytest.approx(average_precision_score(targets[:, c], scores[:, c]), abs=1e-12)
    ref = np.mean([average_precision_score(targets[:, c], scores[:, c]) for c in range(6)])
    assert mean_average_precision(scores, targets) == pytest.approx(ref, abs=1e-12)


def test_map_perfect_ranking_is_one():
    targets = np.eye(4, dtype=int)
    assert mean_average_precision(np.eye(4) * 3.0, targets) == 1.0


def test_map_without_any_positive_is_an_error():
    with pytest.raises(ValueError, match="no class has a positive"):
        mean_average_precision(np.zeros((3, 2)), np.zeros((3, 2), dtype=int))


# ----------------------------------------------------------------------------- report


def test_write_eval_report_local(tmp_path: Path):
    metrics = {
        "count": 6,
        "num_classes": 2,
        "multi_label": False,
        "top1": 0.5,
        "top5": 1.0,
        "per_class": [
            {"index": 0, "name": "cat", "support": 4, "accuracy": 0.25},
            {"index": 1, "name": "dog", "support": 2, "accuracy": 1.0},
        ],
        "confusion": [[1, 3], [0, 2]],
    }
    out = write_eval_report(str(tmp_path / "rep"), metrics, metrics["confusion"], ["cat", "dog"])
    report = json.loads(Path(out, "eval.json").read_text())
    assert report["top1"] == 0.5 and report["class_names"] == ["cat", "dog"] and "confusion" not in report
    rows = list(csv.reader(Path(out, "per_class.csv").open()))
    assert rows[0] == ["index", "name", "support", "accuracy"] and rows[1][1] == "cat" and float(rows[1][3]) == 0.25
    conf = list(csv.reader(Path(out, "confusion.csv").open()))
    assert conf[0] == ["true\\pred", "cat", "dog"] and conf[1] == ["cat", "1", "3"] and conf[2] == ["dog", "0", "2"]


# ------------------------------------------------------------------------ the eval loop


def _tiny_model(num_classes: int):
    import vit

    torch.manual_seed(0)
    model = vit.create_model("vit_tiny_patch16", num_classes=num_classes, img_size=16, patch_size=4, embed_dim=32,
                             depth=1, num_heads=2, mlp_dim=64)
    with torch.no_grad():  # a non-zero head so predictions differ between samples
        model.head.weight.normal_(0, 0.5)
    return model


def test_evaluate_model_counts_every_sample_once(digits_shards):
    from shards.reader import load_manifest
    from vit.evaluate import evaluate_model

    manifest = load_manifest(digits_shards)
    model = _tiny_model(len(manifest["classes"]))
    full = evaluate_model(model, digits_shards, img_size=16, batch_size=64)
    assert full["count"] == manifest["num_samples"]
    assert sum(sum(row) for row in full["confusion"]) == manifest["num_samples"]
    assert [sum(row) for row in full["confusion"]] == manifest["label_histogram"]
    assert 0.0 <= full["top1"] <= full["top5"] <= 1.0
    assert full["top1"] == np.trace(np.array(full["confusion"])) / manifest["num_samples"]
    # the top-1 agrees with a plain argmax over the same eval stream
    from vit.data import EvalStream

    model.eval()
    correct = 0
    with torch.no_grad():
        for batch in EvalStream(digits_shards, img_size=16, batch_size=100, rank=0, world_size=1):
            correct += int((model(batch.images).argmax(1) == batch.targets).sum())
    assert full["top1"] == correct / manifest["num_samples"]


def test_rank_slices_partition_the_dataset(digits_shards):
    from shards.reader import load_manifest
    from vit.evaluate import evaluate_model

    manifest = load_manifest(digits_shards)
    model = _tiny_model(len(manifest["classes"]))
    full = evaluate_model(model, digits_shards, img_size=16, batch_size=64)
    parts = [evaluate_model(model, digits_shards, img_size=16, batch_size=50, rank=r, world_size=3) for r in range(3)]
    assert sum(p["count"] for p in parts) == manifest["num_samples"]
    summed = np.sum([np.array(p["confusion"]) for p in parts], axis=0)
    assert summed.tolist() == full["confusion"]


def test_evaluate_model_rejects_wrong_class_count(digits_shards):
    from vit.evaluate import evaluate_model

    with pytest.raises(ValueError, match="model has 3 classes but"):
        evaluate_model(_tiny_model(3), digits_shards, img_size=16, batch_size=64)


def test_multilabel_sums_give_map():
    from vit.evaluate import _Sums

    sums = _Sums(num_classes=3, multi_label=True)
    scores = torch.tensor([[2.0, -1.0, 0.5], [0.1, 3.0, -2.0], [-1.0, 0.2, 1.0], [1.0, 1.0, -3.0]])
    targets = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=torch.float32)
    sums.add(scores[:2], targets[:2])
    sums.add(scores[2:], targets[2:])
    out = sums.metrics(["a", "b", "c"])
    ref = np.mean([average_precision_score(targets[:, c].numpy(), scores[:, c].numpy()) for c in range(3)])
    assert out["count"] == 4 and out["mAP"] == pytest.approx(ref) and out["confusion"] is None
    assert [p["support"] for p in out["per_class"]] == [2, 2, 2]
