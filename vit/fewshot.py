"""Few-shot linear evaluation of frozen features (the paper's second measure of pretraining).

As big_vision's few-shot evaluator does it: take the representation the head would see (the
pre-logits output, or the pooled token when the model has no pre-logits layer), draw `shots`
training images per class, fit a closed-form ridge regression from those features to {-1, 1}
one-vs-rest targets, and score the arg-max of its outputs on a held-out set. Each shot count is
drawn `draws` times (seeded by (seed, shots, draw)) and the accuracies are averaged.

The fit is ridge with an intercept, solved in float64: with X centred on the mean of the drawn
features and Y on the mean of the targets, W = (Xc^T Xc + l2 I)^-1 Xc^T Yc and b = mean(Y) - mean(X) W
(the same problem as scikit-learn's ``Ridge(alpha=l2, fit_intercept=True)``).

`extract_features` reads a dataset through the evaluation stream (resize + centre crop, every
sample once); `fewshot_eval` is what `vit.train` calls every ``fewshot.every_steps`` on rank 0
and what `vitpipe evaluate RUN --fewshot 1,5,10,25` prints.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from shards.errors import VitpipeError
from vit.config import FewshotConfig


class FewshotError(VitpipeError, ValueError):
    """Few-shot evaluation cannot run on this data or these settings; the message says what to change."""


def ridge_fit(x: np.ndarray, y: np.ndarray, *, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """(W [D, K], b [K]) minimising ||x W + b - y||^2 + l2 ||W||^2 (intercept not penalised)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc
    gram[np.diag_indices_from(gram)] += l2
    w = np.linalg.solve(gram, xc.T @ yc)
    return w, y_mean - x_mean @ w


def pm1_targets(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """One-vs-rest targets: +1 for the true class, -1 for every other class."""
    y = -np.ones((len(labels), num_classes))
    y[np.arange(len(labels)), labels] = 1.0
    return y


def draw_shots(labels: np.ndarray, *, shots: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `shots` distinct samples of every class present in `labels` (sorted by class)."""
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < shots:
            raise FewshotError(f"{shots}-shot evaluation needs {shots} images of class {c}; the training set has "
                             f"{len(members)}: lower the shot count or give a larger --data set")
        picked.append(rng.choice(members, size=shots, replace=False))
    return np.concatenate(picked)


def fewshot_accuracy(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
                     shots: int, l2: float, draws: int, seed: int = 0) -> list[float]:
    """Held-out accuracy of the ridge fit on each of `draws` random draws of `shots` images per class."""
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    out = []
    for draw in range(draws):
        idx = draw_shots(train_y, shots=shots, rng=np.random.default_rng([seed, shots, draw]))
        w, b = ridge_fit(train_x[idx], pm1_targets(train_y[idx], num_classes), l2=l2)
        pred = np.argmax(np.asarray(val_x, dtype=np.float64) @ w + b, axis=1)
        out.append(float(np.mean(pred == val_y)))
    return out


@torch.no_grad()
def extract_features(model: torch.nn.Module, dataset_url: str, *, batch_size: int = 256,
                     num_workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(pre-logits features float32 [N, D], labels int64 [N]) of every image of a single-label dataset."""
    from vit.data import EvalStream

    stream = EvalStream(dataset_url, img_size=model.img_size[0], batch_size=batch_size, num_workers=num_workers)
    if stream.multi_label:
        raise FewshotError(f"{dataset_url} is multi-label; few-shot evaluation needs one label per image")
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    feats, labels = [], []
    try:
        for batch in stream:
            x = batch.images.to(device=param.device, dtype=param.dtype)
            feats.append(model.forward_head(model.forward_features(x), pre_logits=True).float().cpu())
            labels.append(batch.targets.cpu())
    finally:
        model.train(was_training)
    if not feats:
        raise FewshotError(f"{dataset_url}: no readable images for few-shot evaluation")
    return torch.cat(feats).numpy(), torch.cat(labels).numpy().astype(np.int64)


def fewshot_eval(model: torch.nn.Module, train_url: str, val_url: str, *, shots: Sequence[int] = (1, 5, 10, 25),
                 l2: float = 1.0, draws: int = 5, seed: int = 0) -> dict[str, float]:
    """{"fewshot_<k>shot": mean held-out accuracy over the draws} for each shot count k."""
    from vit.evaluate import check_same_class_index

    check_same_class_index(train_url, val_url)
    train_x, train_y = extract_features(model, train_url)
    val_x, val_y = extract_features(model, val_url)
    return {metric_name(k): float(np.mean(fewshot_accuracy(train_x, train_y, val_x, val_y, shots=k, l2=l2,
                                                           draws=draws, seed=seed)))
            for k in shots}


def fewshot_checkpoint(source: str, train_url: str, val_url: str, *, shots: Sequence[int], img_size: int | None = None,
                       l2: float = 1.0, draws: int = 5, report_dir: str | None = None) -> dict:
    """`vitpipe evaluate SOURCE --fewshot ...`: any checkpoint `vit.checkpoint.load_model` reads, at its own
    resolution or `img_size`; writes `fewshot.json` to `report_dir` when given."""
    from shards import storage
    from vit.checkpoint import load_model

    model = load_model(source, img_size=img_size)
    out = {"source": source, "img_size": model.img_size[0], "train_data": train_url, "val_data": val_url, "l2": l2,
           "draws": draws, **fewshot_eval(model, train_url, val_url, shots=shots, l2=l2, draws=draws)}
    if report_dir:
        storage.write_json(storage.join(report_dir, "fewshot.json"), out)
    return out


def metric_name(shots: int) -> str:
    return f"fewshot_{shots}shot"


# ----------------------------------------------------------------------------- during pretraining (vit.train)


def fewshot_columns(cfg: FewshotConfig) -> list[str]:
    """The metrics.csv columns the evaluation adds (none when it is off)."""
    return [metric_name(k) for k in cfg.shots] if cfg.every_steps else []


def fewshot_due(cfg: FewshotConfig, done: int, total: int) -> bool:
    return bool(cfg.every_steps) and (done % cfg.every_steps == 0 or done == total)


def fewshot_metrics(model: torch.nn.Module, cfg: FewshotConfig) -> dict[str, float]:
    """`fewshot_eval` of the model being trained, as the config asks (rounded for metrics.csv)."""
    accuracies = fewshot_eval(model, cfg.data, cfg.val_data, shots=cfg.shots, l2=cfg.l2, draws=cfg.draws)
    return {k: round(v, 6) for k, v in accuracies.items()}


def parse_shots(text: str) -> list[int]:
    """'1,5,10,25' -> [1, 5, 10, 25]; one clear line on anything else."""
    try:
        shots = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        shots = []
    if not shots or any(k < 1 for k in shots):
        raise FewshotError(f"--fewshot {text!r}: give positive shot counts separated by commas, e.g. --fewshot 1,5,10,25")
    return shots
