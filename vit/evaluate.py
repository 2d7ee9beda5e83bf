"""Evaluation: metrics, the (optionally multi-rank) evaluation loop, and the eval report.

Single-label datasets get top-1 / top-5 accuracy, per-class accuracy and the confusion
matrix; multi-label datasets (JFT-style) get mean average precision over the classes that
have at least one positive. Counts are exact: every sample of the dataset is seen exactly
once over all ranks (``vit.data.EvalStream`` never pads), and the ranks' sums are
all-reduced, so 1 rank and N ranks give identical numbers.

Per-rank entry point (what ``pipeline.launcher`` starts when ``--nproc > 1``)::

    python -m vit.evaluate --config eval_config.json
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from shards.errors import VitpipeError


class EvalError(VitpipeError, ValueError):
    """An evaluation that cannot work with this model and dataset (names both and what to do)."""

# ----------------------------------------------------------------------------- metrics


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of samples whose true class is among the k highest logits, for each k.

    k larger than the number of classes counts every sample (the true class is always
    among all classes). Ties rank the lower class index first, like ``argmax``.
    """
    if logits.ndim != 2 or targets.ndim != 1 or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"topk_correct wants logits [B, K] and targets [B]; got {tuple(logits.shape)} and {tuple(targets.shape)}")
    k_max = min(max(ks), logits.shape[1])
    # stable sort: tied logits rank by class index, as argmax does (the confusion matrix agrees with top-1)
    top = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k_max]  # [B, k_max], best first
    hit = top == targets[:, None]
    return {k: int(hit[:, : min(k, k_max)].any(dim=1).sum()) for k in ks}


def confusion_matrix(preds: np.ndarray, targets: np.ndarray, num_classes: int) -> np.ndarray:
    """``C[t, p]`` = number of samples of true class t predicted as p (int64)."""
    preds = np.asarray(preds, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    flat = targets * num_classes + preds
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Recall of each class (diagonal / row sum); NaN for classes with no samples."""
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(confusion) / np.maximum(support, 1), np.nan)


def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-class average precision; NaN for classes with no positive sample.

    ``scores`` [N, K] (any monotone score: logits or probabilities), ``targets`` [N, K] in
    {0, 1}. AP = sum over distinct score thresholds (descending) of
    (R_i - R_{i-1}) * P_i, tied scores forming one threshold: the step-wise definition
    used by ``sklearn.metrics.average_precision_score`` (no interpolation).
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"average_precision wants scores and targets of the same [N, K] shape; got {scores.shape} and {targets.shape}")
    out = np.full(scores.shape[1], np.nan)
    for k in range(scores.shape[1]):
        positive = targets[:, k] > 0
        n_pos = int(positive.sum())
        if n_pos == 0:
            continue
        order = np.argsort(-scores[:, k], kind="stable")
        s, y = scores[order, k], positive[order]
        tp = np.cumsum(y)
        fp = np.cumsum(~y)
        last_of_tie = np.r_[np.diff(s) != 0, True]  # one point per distinct threshold
        tp, fp = tp[last_of_tie], fp[last_of_tie]
        precision = tp / (tp + fp)
        recall = tp / n_pos
        out[k] = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return out


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean of the per-class AP over the classes that have at least one positive."""
    ap = average_precision(scores, targets)
    if np.all(np.isnan(ap)):
        raise ValueError("mean_average_precision: no class has a positive sample; mAP is undefined")
    return float(np.nanmean(ap))


# ----------------------------------------------------------------------- accumulation


@dataclass
class _Sums:
    """What one rank accumulates; summed (single-label) or concatenated (multi-label) over ranks."""

    num_classes: int
    multi_label: bool
    count: int = 0
    correct1: int = 0
    correct5: int = 0
    confusion: np.ndarray = field(default=None)  # type: ignore[assignment]
    scores: list = field(default_factory=list)  # multi-label only
    labels: list = field(default_factory=list)  # multi-label only

    def __post_init__(self):
        if self.confusion is None:
            self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits = logits.detach().float().cpu()
        targets = targets.detach().cpu()
        if logits.shape[1] != self.num_classes:
            raise EvalError(
                f"the model has {logits.shape[1]} outputs but the dataset has {self.num_classes} classes; "
                "evaluate a model fine-tuned on this class index (or re-shard with the model's --classes FILE)"
            )
        self.count += logits.shape[0]
        if self.multi_label:
            self.scores.append(logits.numpy())
            self.labels.append((targets > 0).numpy().astype(np.uint8))
            return
        hits = topk_correct(logits, targets, ks=(1, 5))
        self.correct1 += hits[1]
        self.correct5 += hits[5]
        self.confusion += confusion_matrix(logits.argmax(dim=1).numpy(), targets.numpy(), self.num_classes)

    def reduce(self) -> bool:
        """Sum / gather across ranks when torch.distributed is initialised; True if it did."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return False
        if torch.distributed.get_world_size() == 1:
            return True
        if self.multi_label:
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (self.count, self.scores, self.labels))
            self.count = sum(g[0] for g in gathered)
            self.scores = [s for g in gathered for s in g[1]]
            self.labels = [y for g in gathered for y in g[2]]
            return True
        packed = torch.from_numpy(np.r_[[self.count, self.correct1, self.correct5], self.confusion.ravel()].astype(np.int64))
        torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.SUM)
        values = packed.numpy()
        self.count, self.correct1, self.correct5 = (int(v) for v in values[:3])
        self.confusion = values[3:].reshape(self.num_classes, self.num_classes).copy()
        return True

    def metrics(self, class_names: list[str]) -> dict:
        if self.count == 0:
            raise EvalError("evaluation saw no samples: the dataset is empty")
        out: dict[str, Any] = {"count": self.count, "num_classes": self.num_classes, "multi_label": self.multi_label}
        if self.multi_label:
            scores = np.concatenate(self.scores)
            labels = np.concatenate(self.labels)
            ap = average_precision(scores, labels)
            out["mAP"] = float(np.nanmean(ap)) if not np.all(np.isnan(ap)) else float("nan")
            support = labels.sum(axis=0)
            out["per_class"] = [
                {"index": i, "name": class_names[i], "support": int(support[i]), "ap": _num(ap[i])}
                for i in range(self.num_classes)
            ]
            out["confusion"] = None
            return out
        out["top1"] = self.correct1 / self.count
        out["top5"] = self.correct5 / self.count
        acc = per_class_accuracy(self.confusion)
        support = self.confusion.sum(axis=1)
        out["mean_per_class_accuracy"] = float(np.nanmean(acc)) if not np.all(np.isnan(acc)) else float("nan")
        out["per_class"] = [
            {"index": i, "name": class_names[i], "support": int(support[i]), "accuracy": _num(acc[i])}
            for i in range(self.num_classes)
        ]
        out["confusion"] = self.confusion.tolist()
        return out


def _num(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


# --------------------------------------------------------------------------- the loop


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    dataset_url: str,
    *,
    img_size: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    class_names: list[str] | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> dict:
    """Evaluate ``model`` on every sample of the dataset at ``dataset_url`` (resize + centre crop).

    Runs on this rank's slice; when torch.distributed is initialised the sums are
    all-reduced so every rank returns the metrics of the whole dataset (without it, a rank of
    world_size > 1 returns the metrics of its own slice). Returns a dict with
    ``count``, ``top1``/``top5`` (single-label) or ``mAP`` (multi-label),
    ``mean_per_class_accuracy``, ``per_class`` (list of dicts), ``confusion`` (list of rows
    or None), ``class_names``, ``dataset_url``, ``img_size``.
    """
    from shards.reader import load_manifest
    from vit.data import EvalStream

    manifest = load_manifest(dataset_url)
    classes = list(manifest["classes"])
    if class_names is not None and list(class_names) != classes:
        raise EvalError(f"class_names given to evaluate_model differ from the class index of {dataset_url}")
    multi_label = bool(manifest.get("multi_label", False))
    model_classes = _model_num_classes(model)
    if model_classes is not None and model_classes != len(classes):
        raise EvalError(
            f"the model has {model_classes} classes but {dataset_url} has {len(classes)}; "
            "evaluate a model fine-tuned on this dataset's class index (or shard it with --classes FILE)"
        )
    stream = EvalStream(
        dataset_url, img_size=img_size, batch_size=batch_size, rank=rank, world_size=world_size, num_workers=num_workers
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = _Sums(num_classes=len(classes), multi_label=multi_label)
    bar = None
    if progress:  # on stderr; the metrics line stays alone on stdout
        from tqdm import tqdm

        bar = tqdm(total=stream.num_samples, desc="evaluate", unit="img", dynamic_ncols=True, file=sys.stderr)
    try:
        for batch in stream:
            sums.add(model(batch.images.to(device, non_blocking=True)), batch.targets)
            if bar is not None:
                bar.update(len(batch.targets))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    reduced = sums.reduce()
    out = sums.metrics(classes)
    out.update(class_names=classes, dataset_url=dataset_url, img_size=img_size)
    expected = int(manifest["num_samples"])
    if (world_size == 1 or reduced) and out["count"] != expected:
        raise RuntimeError(
            f"evaluation counted {out['count']} samples but {dataset_url}/manifest.json lists {expected}: "
            "the eval stream dropped or doubled samples"
        )
    return out


def _model_num_classes(model: torch.nn.Module) -> int | None:
    raw = getattr(model, "module", model)
    head = getattr(raw, "head", None)
    return getattr(head, "out_features", None)


# -------------------------------------------------------------------------- the report

SCALAR_KEYS = ("count", "num_classes", "multi_label", "top1", "top5", "mAP", "mean_per_class_accuracy", "img_size", "dataset_url")


def scalar_metrics(metrics: dict) -> dict:
    """The JSON-line / run.json view of an evaluation: scalars only."""
    return {k: metrics[k] for k in SCALAR_KEYS if k in metrics}


def write_eval_report(run_folder_or_dir: Any, metrics: dict, confusion: Any, class_names: list[str]) -> str:
    """Write ``eval.json``, ``per_class.csv`` and ``confusion.csv`` (local dir or s3:// prefix).

    ``run_folder_or_dir`` is a ``vit.runs.RunFolder`` (files go to its ``report/``) or a
    directory URL (files go straight into it). ``eval.json`` is written last so a report
    with ``eval.json`` is complete. Returns the directory URL.
    """
    from shards import storage

    out_dir = _report_dir(run_folder_or_dir)
    per_class = metrics.get("per_class") or []
    value_key = "ap" if metrics.get("multi_label") else "accuracy"
    rows = [["index", "name", "support", value_key]] + [
        [p["index"], p["name"], p["support"], "" if p[value_key] is None else f"{p[value_key]:.6f}"] for p in per_class
    ]
    storage.write_bytes(storage.join(out_dir, "per_class.csv"), _csv_bytes(rows))
    if confusion is not None:
        matrix = np.asarray(confusion, dtype=np.int64)
        header = ["true\\pred"] + list(class_names)
        body = [[class_names[i]] + matrix[i].tolist() for i in range(matrix.shape[0])]
        storage.write_bytes(storage.join(out_dir, "confusion.csv"), _csv_bytes([header] + body))
    report = {k: v for k, v in metrics.items() if k != "confusion"}
    report["class_names"] = list(class_names)
    storage.write_json(storage.join(out_dir, "eval.json"), report)
    return out_dir


def _report_dir(target: Any) -> str:
    if isinstance(target, str):
        return target
    report = getattr(target, "report", None)
    if report is not None:
        return report if isinstance(report, str) else str(report)
    url = getattr(target, "url", None)
    if url is None:
        raise TypeError(f"write_eval_report wants a RunFolder or a directory URL, got {type(target).__name__}")
    from shards import storage

    return storage.join(str(url), "report")


def _csv_bytes(rows: list[list]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode()


# ------------------------------------------------------------------- class index check


def check_same_class_index(train_url: str, val_url: str) -> list[str]:
    """Raise unless both datasets' manifests carry the same ``classes`` list; return it.

    Label ids are positions in the manifest's class index, so a model trained on one
    dataset can only be scored on another that shares the index.
    """
    from shards.reader import load_manifest

    train = list(load_manifest(train_url)["classes"])
    val = list(load_manifest(val_url)["classes"])
    if train == val:
        return train
    for i, (a, b) in enumerate(zip(train, val)):
        if a != b:
            where = f"entry {i} is {a!r} in {train_url} but {b!r} in {val_url}"
            break
    else:
        i = min(len(train), len(val))
        longer, extra = (train_url, train[i]) if len(train) > len(val) else (val_url, val[i])
        where = f"{train_url} has {len(train)} classes and {val_url} has {len(val)}; first extra entry {i} is {extra!r} in {longer}"
    raise EvalError(
        f"class index mismatch between training data and validation data: {where}; "
        "shard both with the same `vitpipe shard --classes FILE` so label ids mean the same class"
    )


# ------------------------------------------------------------------ per-rank entry point


@dataclass
class EvalJob:
    """What one (possibly multi-rank) evaluation needs; written as JSON for ``--config``."""

    source: str  # anything vit.checkpoint.load_model accepts
    data: str  # dataset URL
    img_size: int | None = None  # None: the checkpoint's own resolution
    batch_size: int = 64
    report_dir: str | None = None  # where rank 0 writes the eval report (None: nowhere)
    result: str | None = None  # where rank 0 writes the metrics JSON (None: nowhere)
    num_workers: int = 0
    progress: bool = False  # rank 0 shows a progress bar on stderr

    def __post_init__(self):
        if not self.source or not self.data:
            raise EvalError("EvalJob needs `source` (a checkpoint or run) and `data` (a dataset URL)")
        if self.batch_size < 1:
            raise EvalError(f"EvalJob.batch_size must be >= 1, got {self.batch_size}")


def run_eval_job(job: EvalJob, *, rank: int = 0, world_size: int = 1) -> dict:
    """Load the checkpoint (resampled to ``img_size``), evaluate, rank 0 writes the outputs."""
    from vit.checkpoint import load_model

    model = load_model(job.source, img_size=job.img_size)
    if torch.cuda.is_available():  # unverified on GPU
        model = model.cuda()
    img_size = job.img_size or _model_img_size(model)
    metrics = evaluate_model(
        model, job.data, img_size=img_size, batch_size=job.batch_size, rank=rank, world_size=world_size, num_workers=job.num_workers,
        progress=job.progress and rank == 0,
    )
    metrics["source"] = job.source
    if rank == 0:
        from shards import storage

        if job.report_dir:
            write_eval_report(job.report_dir, metrics, metrics["confusion"], metrics["class_names"])
        if job.result:
            storage.write_json(job.result, {k: v for k, v in metrics.items() if k != "confusion"})
    return metrics


def _model_img_size(model: torch.nn.Module) -> int:
    cfg = getattr(model, "config", None) or {}
    size = cfg.get("img_size")
    if size is None:
        raise EvalError("the checkpoint does not record its img_size; pass --img-size")
    return int(size if isinstance(size, int) else size[0])


def main(argv: list[str] | None = None) -> int:
    """``python -m vit.evaluate --config job.json``: one rank of an evaluation (gloo via env://)."""
    parser = argparse.ArgumentParser(prog="python -m vit.evaluate", description=main.__doc__)
    parser.add_argument("--config", required=True, help="EvalJob as JSON (local path or s3:// URL)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # added by the deepspeed launcher
    args = parser.parse_args(argv)
    from shards import storage

    if os.environ.get("AWS_ENDPOINT_URL"):
        storage.configure(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    job = EvalJob(**storage.read_json(args.config))
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        # gloo also on GPU nodes: only a few integers (or the multi-label scores) cross ranks,
        # and they live on the CPU. The launcher's env (MASTER_ADDR/PORT, RANK) drives env://.
        torch.distributed.init_process_group(backend="gloo")
    try:
        metrics = run_eval_job(job, rank=rank, world_size=world_size)
    finally:
        if world_size > 1:
            torch.distributed.destroy_process_group()
    if rank == 0:
        print(json.dumps(scalar_metrics(metrics)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
