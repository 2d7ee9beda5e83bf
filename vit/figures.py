"""The pictures people judge a ViT by: Figures 6 and 7 of Dosovitskiy et al. (2020).

Numbers first, drawings second. Each ``*_numbers`` style function is a pure tensor
function (tested on its own); each ``draw_*`` function takes those numbers and returns a
matplotlib ``Figure`` (Agg canvas, no pyplot state). ``vit.report`` puts them together
for a run or a checkpoint.

- Fig 7 left:   ``filter_pcs``              principal components of the patch-embedding filters
- Fig 7 centre: ``pos_embed_similarity``    cosine similarity between position embeddings
- Fig 7 right:  ``mean_attention_distance`` per head, against depth, on real images
- Fig 6:        ``attention_rollout``       Abnar & Zuidema (2020) rollout of the class token
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange
from matplotlib.figure import Figure


# ----------------------------------------------------------------------------- numbers


@dataclass(frozen=True)
class FilterPCs:
    components: torch.Tensor  # [k, C, P, P], rows orthonormal when flattened
    explained: torch.Tensor  # [k] fraction of the filters' variance, descending


def filter_pcs(weight: torch.Tensor, *, k: int = 28) -> FilterPCs:
    """Principal components of the D patch-embedding filters ``weight[D, C, P, P]``.

    Each filter is one observation of dimension C*P*P; filters are centred over D and
    the components are the right singular vectors, ordered by explained variance.
    """
    if weight.ndim != 4:
        raise ValueError(f"patch_embed.proj.weight must be [D, C, P, P], got shape {tuple(weight.shape)}")
    d, c, p, q = weight.shape
    x = rearrange(weight.detach().double(), "d c p q -> d (c p q)")
    x = x - x.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    var = s**2
    k = min(k, vh.shape[0])
    explained = var[:k] / var.sum().clamp_min(1e-30)
    comps = rearrange(vh[:k], "k (c p q) -> k c p q", c=c, p=p, q=q)
    return FilterPCs(components=comps.float(), explained=explained.float())


def patch_tokens(pos_embed: torch.Tensor, *, grid: tuple[int, int]) -> torch.Tensor:
    """The position embeddings of the patches, ``[gh*gw, D]`` (prefix tokens dropped)."""
    gh, gw = grid
    pe = pos_embed.detach().float()
    if pe.ndim == 3:
        pe = pe[0]
    n = gh * gw
    if pe.shape[0] < n:
        raise ValueError(f"pos_embed has {pe.shape[0]} tokens, fewer than the {gh}x{gw} grid's {n} patches")
    return pe[pe.shape[0] - n :]


def pos_embed_similarity(pos_embed: torch.Tensor, *, grid: tuple[int, int]) -> torch.Tensor:
    """Cosine similarity of each patch's position embedding to all others: ``[gh, gw, gh, gw]``.

    ``out[i, j]`` is the map (over the grid) of similarities to the patch in row i, column j.
    """
    gh, gw = grid
    pe = torch.nn.functional.normalize(patch_tokens(pos_embed, grid=grid).double(), dim=-1)
    sim = (pe @ pe.T).clamp(-1.0, 1.0).float()
    return rearrange(sim, "(a b) (c d) -> a b c d", a=gh, b=gw, c=gh, d=gw)


def patch_distances(grid: tuple[int, int], *, patch_size: int) -> torch.Tensor:
    """Pixel distance between patch centres, ``[gh*gw, gh*gw]``."""
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij")
    centres = torch.stack([ys.flatten(), xs.flatten()], dim=-1) * patch_size
    return torch.cdist(centres, centres)


def max_patch_distance(grid: tuple[int, int], *, patch_size: int) -> float:
    gh, gw = grid
    return patch_size * math.hypot(gh - 1, gw - 1)


def distance_structure(sim: torch.Tensor) -> float:
    """Pearson correlation between pos-embed similarity and grid distance over all pairs i != j.

    Strongly negative: the embeddings learned the 2-D layout (near patches look alike).
    Near 0: no spatial structure (e.g. at random initialisation).
    """
    gh, gw = sim.shape[:2]
    s = rearrange(sim.double(), "a b c d -> (a b) (c d)")
    d = patch_distances((gh, gw), patch_size=1)
    off = ~torch.eye(gh * gw, dtype=torch.bool)
    s, d = s[off], d[off]
    if s.numel() < 2 or s.std() == 0 or d.std() == 0:
        return 0.0
    return float(torch.corrcoef(torch.stack([s, d]))[0, 1])


def _patch_block(attn: torch.Tensor, *, grid: tuple[int, int]) -> torch.Tensor:
    """Patch-to-patch attention with rows renormalised to sum 1 over patch keys."""
    n = grid[0] * grid[1]
    if attn.shape[-1] < n or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention map of shape {tuple(attn.shape)} does not cover a {grid[0]}x{grid[1]} grid")
    prefix = attn.shape[-1] - n
    a = attn[..., prefix:, prefix:].double()
    return a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def mean_attention_distance(
    attn_maps: list[torch.Tensor], *, grid: tuple[int, int], patch_size: int
) -> torch.Tensor:
    """Mean attention distance in pixels, ``[layers, heads]``, averaged over the batch.

    For each head: mean over query patches q of sum_k a[q, k] * |centre(q) - centre(k)|, where
    a is the attention among patch tokens only (class/prefix tokens dropped, each query row
    renormalised to sum 1 over the patch keys). Always within [0, ``max_patch_distance``].
    """
    dist = patch_distances(grid, patch_size=patch_size)
    rows = []
    for attn in attn_maps:
        a = _patch_block(attn, grid=grid)  # [B, H, N, N]
        per_query = (a * dist).sum(dim=-1)  # [B, H, N]
        rows.append(per_query.mean(dim=(0, 2)))
    return torch.stack(rows).float()


def attention_rollout(attn_maps: list[torch.Tensor], *, grid: tuple[int, int]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of the class token over patches: ``[B, gh, gw]``.

    Per layer: average heads, add the identity (the residual path), renormalise rows; multiply
    the layers (last @ ... @ first). The class token's row over the patch tokens is returned,
    renormalised to sum 1. A model without prefix tokens (mean pooling) uses the mean of all
    token rows, which is what its pooled output mixes.
    """
    gh, gw = grid
    n = gh * gw
    rollout = None
    for attn in attn_maps:
        a = attn.double().mean(dim=1)  # [B, T, T]
        a = a + torch.eye(a.shape[-1], dtype=a.dtype)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    if rollout is None:
        raise ValueError("attention_rollout needs the attention maps of at least one layer")
    prefix = rollout.shape[-1] - n
    if prefix < 0:
        raise ValueError(f"attention maps have {rollout.shape[-1]} tokens, fewer than the {gh}x{gw} grid")
    row = rollout[:, 0, prefix:] if prefix > 0 else rollout.mean(dim=1)
    row = row / row.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return rearrange(row.float(), "b (h w) -> b h w", h=gh, w=gw)


# ----------------------------------------------------------------------------- drawings

_DPI = 100


def _unit(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def draw_filter_pcs(pcs: FilterPCs, *, title: str = "") -> Figure:
    """Each component as an RGB image (min-max scaled per component), like Fig 7 left."""
    k = pcs.components.shape[0]
    cols = min(7, k)
    rows = math.ceil(k / cols)
    fig = Figure(figsize=(1.2 * cols, 1.35 * rows + 0.5), dpi=_DPI)
    for i in range(k):
        ax = fig.add_subplot(rows, cols, i + 1)
        img = rearrange(pcs.components[i], "c p q -> p q c").numpy()
        if img.shape[-1] != 3:
            img = img.mean(axis=-1)
        ax.imshow(_unit(img), cmap=None if img.ndim == 3 else "gray", interpolation="nearest")
        ax.set_title(f"{100 * float(pcs.explained[i]):.1f}%", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or f"Patch-embedding filters: top {k} principal components (% variance)", fontsize=9)
    fig.tight_layout()
    return fig


def similarity_mosaic(sim: torch.Tensor) -> np.ndarray:
    """Tile the gh*gw small maps into one array, NaN gutters between them."""
    gh, gw = sim.shape[:2]
    tiles = torch.full((gh, gw, gh + 1, gw + 1), float("nan"))
    tiles[:, :, :gh, :gw] = sim
    return rearrange(tiles, "a b c d -> (a c) (b d)").numpy()


def draw_pos_embed_similarity(sims: dict[str, torch.Tensor]) -> Figure:
    """One panel per label (e.g. this run and its parent), each a grid of small maps (Fig 7 centre)."""
    side = max(5.2, 0.3 * max(s.shape[0] for s in sims.values()))  # keep big grids' tiles legible
    fig = Figure(figsize=(side * len(sims), side), dpi=_DPI)
    image = None
    for i, (label, sim) in enumerate(sims.items()):
        ax = fig.add_subplot(1, len(sims), i + 1)
        image = ax.imshow(similarity_mosaic(sim), cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
        gh, gw = sim.shape[:2]
        ax.set_title("\n".join(textwrap.wrap(f"{label}: {gh}x{gw} grid", 40)), fontsize=9)
        ax.set_xticks([(j + 0.5) * (gw + 1) - 1 for j in range(gw)], [str(j + 1) for j in range(gw)], fontsize=5)
        ax.set_yticks([(j + 0.5) * (gh + 1) - 1 for j in range(gh)], [str(j + 1) for j in range(gh)], fontsize=5)
        ax.set_xlabel("input patch column", fontsize=8)
        ax.set_ylabel("input patch row", fontsize=8)
    fig.colorbar(image, ax=fig.axes, shrink=0.8, label="cosine similarity")
    fig.suptitle("Position-embedding similarity", fontsize=10)
    return fig


def draw_attention_distance(mad: torch.Tensor, *, max_distance: float) -> Figure:
    """Mean attention distance of every head against depth (Fig 7 right)."""
    layers, heads = mad.shape
    fig = Figure(figsize=(5, 4), dpi=_DPI)
    ax = fig.add_subplot(1, 1, 1)
    depth = np.arange(1, layers + 1)
    for h in range(heads):
        ax.scatter(depth, mad[:, h].numpy(), s=14, label=f"head {h + 1}")
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_ylim(0, max_distance * 1.02)
    ax.set_xticks(depth)
    if heads <= 16:
        ax.legend(fontsize=6, ncol=2, loc="lower right")
    ax.set_title("Attention distance per head (patch tokens, real images)", fontsize=9)
    fig.tight_layout()
    return fig


def draw_rollout(images: np.ndarray, maps: torch.Tensor, *, names: list[str]) -> Figure:
    """Input | input * rollout mask (upsampled, scaled to max 1), like Fig 6 | the map itself."""
    b = images.shape[0]
    fig = Figure(figsize=(8, 2.8 * b), dpi=_DPI)
    size = images.shape[1:3]
    up = torch.nn.functional.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    for i in range(b):
        mask = up[i].numpy()
        mask = mask / max(float(mask.max()), 1e-30)
        panels = [
            (images[i], names[i]),
            ((images[i].astype(np.float32) * mask[..., None]).astype(np.uint8), "image x rollout"),
        ]
        for j, (picture, title) in enumerate(panels):
            ax = fig.add_subplot(b, 3, 3 * i + j + 1)
            ax.imshow(picture)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        ax = fig.add_subplot(b, 3, 3 * i + 3)
        shown = ax.imshow(maps[i].numpy(), cmap="magma", interpolation="nearest")
        ax.set_title(f"rollout over patches (max {float(maps[i].max()):.3f})", fontsize=8)
        ax.axis("off")
        fig.colorbar(shown, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def draw_curves(curves: dict[str, dict[str, list[tuple[float, float]]]]) -> Figure:
    """Training curves: one panel per quantity, one line per run (label -> column -> [(step, value)])."""
    columns = sorted({c for run in curves.values() for c in run}, key=curve_order)
    fig = Figure(figsize=(4 * min(len(columns), 3), 3 * math.ceil(len(columns) / 3)), dpi=_DPI)
    cols = min(len(columns), 3)
    for i, column in enumerate(columns):
        ax = fig.add_subplot(math.ceil(len(columns) / cols), cols, i + 1)
        for label, run in curves.items():
            points = run.get(column)
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, ms=3, label=label)
        ax.set_title(column, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.set_ylabel(CURVE_LABELS.get(column, column), fontsize=8)
        if column == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if len(curves) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# metrics.csv / eval columns -> y-axis label with its unit
CURVE_LABELS = {
    "loss": "training loss (nats)",
    "eval_loss": "eval loss (nats)",
    "top1": "top-1 accuracy (fraction)",
    "eval_top1": "eval top-1 accuracy (fraction)",
    "val_top1": "val top-1 accuracy (fraction)",
    "lr": "learning rate (per step)",
    "images_per_sec": "throughput (images/s, all ranks)",
    "mfu": "model FLOPs utilisation (fraction of peak)",
    "epoch": "epoch (passes over the data)",
}


def curve_order(column: str) -> tuple[int, str]:
    known = ["loss", "eval_loss", "top1", "eval_top1", "lr", "images_per_sec"]
    return (known.index(column) if column in known else len(known), column)
