"""The inspection report of a run or a checkpoint: Figures 6 and 7 + training curves.

``write_report(source, out_dir=..., images=...)`` loads any checkpoint this project can
load (a run folder, a timm file, a big_vision .npz), runs a few real photographs through it
(scikit-image's, shipped with the package: no network), draws the figures of
``vit.figures``, and publishes PNGs, ``numbers.json``, ``report.md`` and last the
self-contained ``report.html`` (every PNG embedded as a data URI) to ``<run>/report/`` or
``out_dir`` (local folder or s3:// prefix, through ``shards.storage``).
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from einops import rearrange
from PIL import Image

from shards import storage
from shards.errors import VitpipeError
from shards.format import IMAGE_EXTS
from vit import figures as F
from vit.augment import INCEPTION_MEAN, INCEPTION_STD, normalize
from vit.runs import RunFolder

REPORT_HTML = "report.html"
DEFAULT_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
IMAGE_SUFFIXES = tuple(f".{ext}" for ext in IMAGE_EXTS)
MAX_IMAGES = 8
_SKIP_COLUMNS = {"step", "epoch", "time", "timestamp", "wall", "wall_time", "elapsed"}
_MAX_CURVES = 9


class ReportError(VitpipeError):
    """Bad input to the report: names the file or URL and what to do."""


# ----------------------------------------------------------------------------- inputs


def load_photos(images: str | None = None, *, img_size: tuple[int, int]) -> tuple[list[str], np.ndarray]:
    """Real photographs as uint8 ``[B, H, W, 3]`` (resize shorter side, centre crop).

    ``images`` None: scikit-image's bundled photographs (astronaut, coffee, chelsea, rocket).
    Otherwise a folder (local or s3://) of image files; the first ``MAX_IMAGES`` by name.
    """
    if images is None:
        import skimage.data

        named = [(n, Image.fromarray(getattr(skimage.data, n)())) for n in DEFAULT_PHOTOS]
    else:
        check_images(images)
        names = sorted(n for n in storage.listdir(images) if n.lower().endswith(IMAGE_SUFFIXES))[:MAX_IMAGES]
        if not names:
            raise ReportError(f"--images {images}: no image files ({', '.join(IMAGE_SUFFIXES)}) in the folder")
        named = [(n, _open_image(storage.join(images, n))) for n in names]
    return [n for n, _ in named], np.stack([_resize_crop(im, img_size) for _, im in named])


def _open_image(url: str) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(storage.read_bytes(url)))
        im.load()
    except OSError as err:
        raise ReportError(f"{url}: not a readable image ({err}); remove it from the --images folder") from None
    return im


def check_images(images: str) -> None:
    if not storage.exists(images):
        raise ReportError(f"--images {images}: no such folder; give a folder of .jpg/.png photographs")


def _resize_crop(im: Image.Image, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    im = im.convert("RGB")
    scale = max(h / im.height, w / im.width)
    im = im.resize((max(w, round(im.width * scale)), max(h, round(im.height * scale))), Image.BICUBIC)
    top, left = (im.height - h) // 2, (im.width - w) // 2
    return np.asarray(im.crop((left, top, left + w, top + h)), dtype=np.uint8)


def photos_to_tensor(photos: np.ndarray) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]`` -> the training pipeline's input (the paper's [-1, 1] scaling)."""
    return normalize(rearrange(torch.from_numpy(photos), "b h w c -> b c h w"), mean=INCEPTION_MEAN, std=INCEPTION_STD)


def read_curves(run: RunFolder) -> dict[str, list[tuple[float, float]]]:
    """Numeric columns of the run's ``metrics.csv`` against ``step``; {} when the file is absent."""
    if not storage.exists(run.metrics):
        return {}
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(run.metrics).decode("utf-8"))))
    if rows and "step" not in rows[0]:
        raise ReportError(f"{run.metrics}: no 'step' column; metrics.csv needs a header with step, loss, lr, images_per_sec")
    curves: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        step = _number(row.get("step"))
        if step is None:
            continue
        for column, value in row.items():
            v = _number(value)
            if column and column not in _SKIP_COLUMNS and v is not None:
                curves.setdefault(column, []).append((step, v))
    return dict(sorted(curves.items(), key=lambda kv: F.curve_order(kv[0]))[:_MAX_CURVES])


def _number(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def eval_metrics(run: RunFolder) -> dict:
    """Scalars of the run's evaluation: ``report/eval.json`` or ``eval.json``, else run.json metrics."""
    for url in (storage.join(run.report, "eval.json"), run.file("eval.json")):
        if storage.exists(url):
            return _scalars(storage.read_json(url))
    return _scalars((run.read_run() or {}).get("metrics") or {})


def is_run_folder(url: str) -> bool:
    run = RunFolder(url)
    return any(storage.exists(u) for u in (run.run_json, run.metrics, run.model_config))


def parent_run(run: RunFolder) -> RunFolder | None:
    """The parent run (a sibling under ``<root>/runs/``) named in run.json, if any."""
    parent = (run.read_run() or {}).get("parent")
    return RunFolder(storage.join(storage.parent(run.url), parent)) if parent else None


# ----------------------------------------------------------------------------- analysis


@dataclass
class Analysis:
    numbers: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)  # file name -> figure
    captions: dict[str, str] = field(default_factory=dict)


@torch.no_grad()
def analyse(
    model: torch.nn.Module,
    *,
    photos: np.ndarray,
    names: list[str],
    others: dict[str, torch.nn.Module] | None = None,
    label: str = "this model",
    num_pcs: int = 28,
) -> Analysis:
    """Compute every figure of the report for ``model`` (``others``: models to compare pos-embeds with)."""
    out = Analysis()
    model.eval()
    grid, patch = tuple(model.grid), int(model.patch_size)
    cfg = model.config
    out.numbers["model"] = {
        "name": cfg.get("name"), "img_size": list(model.img_size), "patch_size": patch, "grid": list(grid),
        "depth": cfg.get("depth"), "num_heads": cfg.get("num_heads"), "embed_dim": cfg.get("embed_dim"),
        "params": sum(p.numel() for p in model.parameters()),
    }

    pcs = F.filter_pcs(model.patch_embed.proj.weight, k=num_pcs)
    out.figures["fig7_filters.png"] = F.draw_filter_pcs(pcs)
    out.captions["fig7_filters.png"] = (
        f"Fig 7 (left): top {pcs.components.shape[0]} principal components of the {model.patch_embed.proj.weight.shape[0]} "
        f"patch-embedding filters ({patch}x{patch} RGB), each scaled to [0, 1]; title = share of the filters' variance.")
    out.numbers["filters"] = {
        "explained_top": [round(float(v), 4) for v in pcs.explained],
        "explained_cumulative": round(float(pcs.explained.sum()), 4),
    }

    sims = {label: F.pos_embed_similarity(model.pos_embed, grid=grid)}
    structure = {label: F.distance_structure(sims[label])}
    for other_label, other in (others or {}).items():
        ogrid = tuple(other.grid)
        sims[other_label] = F.pos_embed_similarity(other.pos_embed, grid=ogrid)
        structure[other_label] = F.distance_structure(sims[other_label])
        if ogrid != grid:
            resampled = _resample(other, grid=grid)
            key = f"{other_label} resampled to {grid[0]}x{grid[1]}"
            sims[key] = F.pos_embed_similarity(resampled, grid=grid)
            structure[key] = F.distance_structure(sims[key])
            mine = torch.nn.functional.normalize(F.patch_tokens(model.pos_embed, grid=grid), dim=-1)
            theirs = torch.nn.functional.normalize(F.patch_tokens(resampled, grid=grid), dim=-1)
            out.numbers.setdefault("pos_embed_vs_resampled_cosine", {})[other_label] = round(
                float((mine * theirs).sum(-1).mean()), 4)
    out.figures["fig7_pos_embed.png"] = F.draw_pos_embed_similarity(sims)
    out.captions["fig7_pos_embed.png"] = (
        "Fig 7 (centre): tile (row i, column j) shows the cosine similarity of patch (i, j)'s position embedding "
        "to every patch's. Structure = Pearson correlation of similarity with grid distance "
        "(strongly negative: the 2-D layout was learned; ~0: none)."
        + (" Panels: " + ", ".join(sims) + "." if len(sims) > 1 else ""))
    out.numbers["pos_embed_distance_correlation"] = {k: round(v, 4) for k, v in structure.items()}

    distance_sum, rollouts = None, []
    x = photos_to_tensor(photos)
    for i in range(x.shape[0]):  # one image at a time: attention maps of big models are large
        maps = model.attention_maps(x[i : i + 1])
        mad = F.mean_attention_distance(maps, grid=grid, patch_size=patch)
        distance_sum = mad if distance_sum is None else distance_sum + mad
        rollouts.append(F.attention_rollout(maps, grid=grid))
    mad = distance_sum / x.shape[0]
    max_d = F.max_patch_distance(grid, patch_size=patch)
    out.figures["fig7_attention_distance.png"] = F.draw_attention_distance(mad, max_distance=max_d)
    out.captions["fig7_attention_distance.png"] = (
        f"Fig 7 (right): mean attention distance per head (pixels at {model.img_size[0]}x{model.img_size[1]}) over "
        f"{x.shape[0]} photographs: for each head, the mean over query patches of sum_k attn[q,k] * distance(q,k); "
        "patch tokens only, each query row renormalised over patch keys.")
    out.numbers["attention_distance"] = {
        "per_layer_mean": [round(float(v), 3) for v in mad.mean(dim=1)],
        "per_layer_min": [round(float(v), 3) for v in mad.min(dim=1).values],
        "per_layer_max": [round(float(v), 3) for v in mad.max(dim=1).values],
        "max_possible": round(max_d, 3),
        "uniform_attention": round(float(F.patch_distances(grid, patch_size=patch).mean()), 3),
    }

    rollout = torch.cat(rollouts)
    out.figures["fig6_rollout.png"] = F.draw_rollout(photos, rollout, names=names)
    out.captions["fig6_rollout.png"] = (
        "Fig 6: attention rollout (Abnar & Zuidema 2020: heads averaged, identity added, rows renormalised, "
        "layers multiplied) of the class token over the patches, upsampled and multiplied into the photograph."
        + ("" if model.num_prefix_tokens else " (No class token: mean of all token rows.)"))
    n = rollout[0].numel()
    entropy = -(rollout.clamp_min(1e-30) * rollout.clamp_min(1e-30).log()).flatten(1).sum(-1) / math.log(n)
    out.numbers["rollout"] = {
        "images": names,
        "normalised_entropy": [round(float(v), 4) for v in entropy],  # 1 = uniform over patches
        "max_patch_mass": [round(float(v), 4) for v in rollout.flatten(1).max(-1).values],
    }
    return out


def _resample(model: torch.nn.Module, *, grid: tuple[int, int]) -> torch.Tensor:
    from vit.pos_embed import resample_pos_embed

    return resample_pos_embed(model.pos_embed.detach(), grid, old_grid=tuple(model.grid),
                              num_prefix_tokens=model.num_prefix_tokens)


def add_curves(out: Analysis, runs: dict[str, RunFolder]) -> None:
    """Training / fine-tuning curves of the runs (label -> run) and their final numbers."""
    curves = {label: c for label, run in runs.items() if (c := read_curves(run))}
    for label, run in runs.items():
        ev = eval_metrics(run)
        if ev:
            out.numbers.setdefault("eval", {})[label] = ev
    if not curves:
        return
    out.figures["curves.png"] = F.draw_curves(curves)
    out.captions["curves.png"] = "Training curves from metrics.csv: " + ", ".join(curves) + "."
    for label, c in curves.items():
        summary = {}
        if c.get("loss"):
            summary["final_loss"] = c["loss"][-1][1]
            summary["min_loss"] = min(v for _, v in c["loss"])
            summary["steps"] = int(c["loss"][-1][0])
        if c.get("images_per_sec"):
            summary["median_images_per_sec"] = statistics.median(v for _, v in c["images_per_sec"])
        for key in ("top1", "eval_top1", "val_top1", *(k for k in c if k.startswith("fewshot_"))):
            if c.get(key):
                summary[f"final_{key}"] = c[key][-1][1]
        out.numbers.setdefault("training", {})[label] = summary


# ----------------------------------------------------------------------------- output


def render_html(*, title: str, out: Analysis, pngs: dict[str, bytes]) -> str:
    """One self-contained page: every PNG embedded as a data URI (and linked by file name)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "img{max-width:100%;border:1px solid #ddd}figcaption{font-size:90%;color:#444}"
        "pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:85%}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for name, data in pngs.items():
        b64 = base64.b64encode(data).decode("ascii")
        parts.append(
            f"<figure id='{html.escape(name)}'><img alt='{html.escape(name)}' data-file='{html.escape(name)}' "
            f"src='data:image/png;base64,{b64}'><figcaption><a href='{html.escape(name)}'>{html.escape(name)}</a>: "
            f"{html.escape(out.captions.get(name, ''))}</figcaption></figure>")
    parts.append("<h2>Numbers</h2><pre>" + html.escape(json.dumps(out.numbers, indent=2, default=str)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(*, title: str, out: Analysis, html_url: str) -> str:
    """The short summary the orchestrator attaches as a Prefect artifact."""
    n = out.numbers
    m = n.get("model", {})
    lines = [f"# {title}", "", f"Report: `{html_url}`", "", "| what | value |", "|---|---|",
             f"| model | {m.get('name')} {m.get('img_size')} patch {m.get('patch_size')}, {m.get('params', 0):,} params |"]
    if "filters" in n:
        lines.append(f"| filter PCs: variance in top {len(n['filters']['explained_top'])} | "
                     f"{100 * n['filters']['explained_cumulative']:.1f}% |")
    for label, v in n.get("pos_embed_distance_correlation", {}).items():
        lines.append(f"| pos-embed similarity vs distance ({label}) | {v:+.3f} |")
    if "attention_distance" in n:
        a = n["attention_distance"]
        lines.append(f"| mean attention distance, first -> last layer (px) | {a['per_layer_mean'][0]:.1f} -> "
                     f"{a['per_layer_mean'][-1]:.1f} (uniform {a['uniform_attention']:.1f}, max {a['max_possible']:.1f}) |")
    if "rollout" in n:
        lines.append(f"| rollout entropy (1 = uniform), mean over photos | "
                     f"{statistics.mean(n['rollout']['normalised_entropy']):.3f} |")
    for label, t in n.get("training", {}).items():
        text = ", ".join(f"{k} {v:.4g}" for k, v in t.items())
        lines.append(f"| training ({label}) | {text} |")
    for label, ev in n.get("eval", {}).items():
        text = ", ".join(f"{k} {ev[k]:.4g}" for k in ("top1", "top5", "mAP") if k in ev)
        if text:
            lines.append(f"| eval ({label}) | {text} |")
    return "\n".join(lines) + "\n"


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_report(
    run_url_or_dir: str,
    *,
    out_dir: str | None = None,
    images: str | None = None,
    compare: str | None = None,
    num_pcs: int = 28,
) -> dict[str, Any]:
    """Draw and publish the report of a run folder or checkpoint.

    Returns ``dict(html=url, pngs=[urls], numbers={...}, markdown=str)``. ``out_dir``
    defaults to ``<run>/report`` for a run folder and is required for a checkpoint file.
    The run's parent (run.json ``parent``) and ``compare`` are drawn beside it.
    """
    from vit.checkpoint import load_model

    source = str(run_url_or_dir)
    run = is_run_folder(source)
    if out_dir is None:
        if not run:
            raise ReportError(f"{source} is a checkpoint file, not a run folder: pass out_dir (--out DIR)")
        out_dir = RunFolder(source).report
    if images is not None:
        check_images(images)  # fail before the (possibly long) model load
    model = load_model(source)
    names, photos = load_photos(images, img_size=tuple(model.img_size))

    label = storage.basename(source) or source
    others: dict[str, torch.nn.Module] = {}
    runs = {label: RunFolder(source)} if run else {}
    parent = parent_run(RunFolder(source)) if run else None
    if parent:
        parent_label = "parent " + parent.run_id
        runs = {parent_label: parent, **runs}
        if storage.exists(parent.model):
            others[parent_label] = load_model(parent.url)
    if compare:
        others["compare " + storage.basename(compare)] = load_model(compare)

    out = analyse(model, photos=photos, names=names, others=others, label=label, num_pcs=num_pcs)
    add_curves(out, runs)
    pngs = {name: _png(fig) for name, fig in out.figures.items()}
    title = f"ViT inspection: {label}"
    html_url = storage.join(out_dir, REPORT_HTML)
    markdown = render_markdown(title=title, out=out, html_url=html_url)
    page = render_html(title=title, out=out, pngs=pngs)

    if storage.exists(html_url):
        storage.delete(html_url)  # a report.html is only ever next to the PNGs it embeds
    png_urls = []
    for name, data in pngs.items():
        png_urls.append(storage.join(out_dir, name))
        storage.write_bytes(png_urls[-1], data)
    storage.write_json(storage.join(out_dir, "numbers.json"), out.numbers)
    storage.write_bytes(storage.join(out_dir, "report.md"), markdown.encode("utf-8"))
    storage.write_bytes(html_url, page.encode("utf-8"))  # last: a report with report.html is complete
    return {"html": html_url, "pngs": png_urls, "numbers": out.numbers, "markdown": markdown}
