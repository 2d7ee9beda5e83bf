"""vit.figures / vit.report: the numbers behind Figures 6 and 7, and the report that shows them."""
from __future__ import annotations

import base64
import json
import math
import re

import pytest
import torch

import vit
from vit import figures as F

GRID = (4, 4)
PATCH = 8


def tiny(img_size: int = 32, **kw) -> vit.VisionTransformer:
    torch.manual_seed(0)
    args = dict(patch_size=PATCH, embed_dim=32, depth=3, num_heads=2, mlp_dim=64)
    return vit.create_model("vit_tiny_patch16", num_classes=5, img_size=img_size, **{**args, **kw})


def sincos_2d(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """A position embedding with known 2-D structure (1 prefix token + grid)."""
    ys, xs = torch.meshgrid(torch.arange(grid[0]).float(), torch.arange(grid[1]).float(), indexing="ij")
    freqs = 1.0 / 10 ** (torch.arange(dim // 4).float() / (dim // 4))
    parts = [f(c.flatten()[:, None] * freqs) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat([torch.zeros(1, dim), torch.cat(parts, dim=1)])[None]


# ----------------------------------------------------------------------------- PCA (Fig 7 left)


def test_filter_pcs_orthonormal_ordered_and_finds_the_dominant_direction():
    torch.manual_seed(0)
    u, v = torch.randn(3 * 4 * 4), torch.randn(3 * 4 * 4)
    u = u / u.norm()
    v = v - (v @ u) * u
    v = v / v.norm()
    a, b = 5 * torch.randn(200), torch.randn(200)
    weight = (a[:, None] * u + b[:, None] * v + 0.01 * torch.randn(200, 48)).reshape(200, 3, 4, 4)
    pcs = F.filter_pcs(weight, k=28)
    flat = pcs.components.flatten(1).double()
    assert pcs.components.shape == (28, 3, 4, 4)
    assert torch.allclose(flat @ flat.T, torch.eye(28, dtype=torch.float64), atol=1e-5)
    assert torch.all(pcs.explained[:-1] >= pcs.explained[1:])
    assert 0.99 < float(pcs.explained.sum()) <= 1.0 + 1e-6  # rank ~2 data: two PCs hold nearly all
    assert abs(float(flat[0].float() @ u)) > 0.999 and abs(float(flat[1].float() @ v)) > 0.999
    assert float(pcs.explained[0]) > 0.9


def test_filter_pcs_k_capped_by_dimension():
    pcs = F.filter_pcs(torch.randn(64, 3, 2, 2), k=28)
    assert pcs.components.shape[0] == 12
    with pytest.raises(ValueError, match=r"\[D, C, P, P\]"):
        F.filter_pcs(torch.randn(64, 12))


# ----------------------------------------------------------------------------- pos-embed similarity (Fig 7 centre)


def test_pos_embed_similarity_diagonal_one_symmetric_bounded():
    model = tiny()
    sim = F.pos_embed_similarity(model.pos_embed, grid=model.grid)
    flat = sim.reshape(16, 16)
    assert sim.shape == (4, 4, 4, 4)
    assert torch.allclose(flat.diagonal(), torch.ones(16), atol=1e-6)
    assert torch.allclose(flat, flat.T, atol=1e-6)
    assert float(flat.min()) >= -1 and float(flat.max()) <= 1
    # the tile of patch (i, j) has its maximum (1) at (i, j)
    for i, j in [(0, 0), (2, 3)]:
        assert divmod(int(sim[i, j].argmax()), 4) == (i, j)


def test_distance_structure_separates_learned_layout_from_noise():
    grid = (6, 6)
    structured = F.distance_structure(F.pos_embed_similarity(sincos_2d(grid, 64), grid=grid))
    torch.manual_seed(0)
    noise = F.distance_structure(F.pos_embed_similarity(torch.randn(1, 37, 64), grid=grid))
    assert structured < -0.7
    assert abs(noise) < 0.2


# ----------------------------------------------------------------------------- attention distance (Fig 7 right)


def _with_cls(patch_attn: torch.Tensor, cls_mass: float) -> torch.Tensor:
    """[H, N, N] patch attention -> [1, H, 1+N, 1+N] where every query gives cls_mass to the class token."""
    h, n, _ = patch_attn.shape
    full = torch.zeros(1, h, n + 1, n + 1)
    full[0, :, 1:, 1:] = (1 - cls_mass) * patch_attn
    full[0, :, 1:, 0] = cls_mass
    full[0, :, 0, :] = 1.0 / (n + 1)
    return full


def test_mean_attention_distance_self_attention_is_zero():
    maps = [_with_cls(torch.eye(16).expand(2, 16, 16), cls_mass=0.5)]
    mad = F.mean_attention_distance(maps, grid=GRID, patch_size=PATCH)
    assert mad.shape == (1, 2)
    assert torch.allclose(mad, torch.zeros(1, 2), atol=1e-6)


def test_mean_attention_distance_uniform_is_mean_pairwise_distance():
    # 2x2 grid, patch 4: each query sees distances 0, 4, 4 and 4*sqrt(2), whatever the class token took
    maps = [_with_cls(torch.full((3, 4, 4), 0.25), cls_mass=0.3)]
    mad = F.mean_attention_distance(maps, grid=(2, 2), patch_size=4)
    expected = (0 + 4 + 4 + 4 * math.sqrt(2)) / 4
    assert torch.allclose(mad, torch.full((1, 3), expected), atol=1e-5)


def test_mean_attention_distance_neighbour_attention_is_one_patch():
    # every query attends only to the patch on its right (row-wise wrap excluded: last column attends left)
    n = 16
    a = torch.zeros(n, n)
    for q in range(n):
        r, c = divmod(q, 4)
        a[q, r * 4 + (c + 1 if c < 3 else c - 1)] = 1
    mad = F.mean_attention_distance([a[None, None]], grid=GRID, patch_size=PATCH)  # no prefix tokens
    assert torch.allclose(mad, torch.full((1, 1), float(PATCH)))


def test_mean_attention_distance_on_real_model_within_bounds():
    model = tiny().eval()
    with torch.no_grad():
        maps = model.attention_maps(torch.randn(2, 3, 32, 32))
    mad = F.mean_attention_distance(maps, grid=model.grid, patch_size=model.patch_size)
    assert mad.shape == (3, 2)
    assert float(mad.min()) >= 0
    assert float(mad.max()) <= F.max_patch_distance(model.grid, patch_size=model.patch_size) + 1e-4


# ----------------------------------------------------------------------------- rollout (Fig 6)


def test_rollout_follows_attention_through_layers():
    # layer 1: patch 5 attends to patch 10, everything else to itself; layer 2: cls attends to patch 5.
    t = 17
    a1 = torch.eye(t)
    a1[1 + 5] = 0
    a1[1 + 5, 1 + 10] = 1
    a2 = torch.eye(t)
    a2[0] = 0
    a2[0, 1 + 5] = 1
    maps = [a1.expand(1, 2, t, t), a2.expand(1, 2, t, t)]
    r = F.attention_rollout(maps, grid=GRID).flatten()
    expected = torch.zeros(16)
    expected[5] = expected[10] = 0.5
    assert torch.allclose(r, expected, atol=1e-6)


def test_rollout_uniform_class_attention_gives_uniform_map():
    t = 17
    a = torch.eye(t)
    a[0] = torch.cat([torch.zeros(1), torch.full((16,), 1 / 16)])
    r = F.attention_rollout([a[None, None]], grid=GRID)
    assert torch.allclose(r, torch.full((1, 4, 4), 1 / 16), atol=1e-6)


def test_rollout_on_real_model_non_negative_and_sums_to_one():
    for model in (tiny(), tiny(pool="mean", class_token=False)):
        with torch.no_grad():
            maps = model.eval().attention_maps(torch.randn(3, 3, 32, 32))
        r = F.attention_rollout(maps, grid=model.grid)
        assert r.shape == (3, 4, 4)
        assert float(r.min()) >= 0
        assert torch.allclose(r.flatten(1).sum(-1), torch.ones(3), atol=1e-5)


# ----------------------------------------------------------------------------- the report


def _write_run(root, run_id: str, model, *, parent: str | None, rows: list[dict], eval_json: dict | None = None):
    from vit.checkpoint import save_model
    from vit.runs import RunFolder
    from shards import storage

    run = RunFolder.create(str(root), run_id)
    run.start(kind="finetune" if parent else "pretrain", parent=parent)
    save_model(model, run.url)
    fields = list(rows[0])
    lines = [",".join(fields)] + [",".join(str(r.get(f, "")) for f in fields) for r in rows]
    storage.write_bytes(run.metrics, ("\n".join(lines) + "\n").encode())
    if eval_json:
        storage.write_json(storage.join(run.report, "eval.json"), eval_json)
    run.finish(metrics={"top1": eval_json["top1"]} if eval_json else {})
    return run


def _embedded_pngs(page: str) -> dict[str, bytes]:
    found = re.findall(r"data-file='([^']+)' src='data:image/png;base64,([^']+)'", page)
    return {name: base64.b64decode(data) for name, data in found}


@pytest.mark.timeout(120)
def test_write_report_for_finetune_run_with_parent(tmp_path):
    from vit.report import write_report

    pre = _write_run(tmp_path, "pretrain-20260101-000000-aaaaaa", tiny(32), parent=None,
                     rows=[{"step": s, "epoch": 0, "loss": 2.0 - s / 100, "lr": 1e-3, "images_per_sec": 50 + s,
                            "mfu": 0.1} for s in range(1, 31)])
    ft = _write_run(tmp_path, "finetune-20260101-010000-bbbbbb", tiny(48), parent=pre.run_id,
                    rows=[{"step": s, "loss": 1.0 / s, "lr": 1e-4, "images_per_sec": 40, "top1": s / 20}
                          for s in range(1, 11)],
                    eval_json={"top1": 0.75, "top5": 0.95, "count": 100, "class_names": ["a"]})
    result = write_report(ft.url)

    assert result["html"] == str(tmp_path / "runs" / ft.run_id / "report" / "report.html")
    names = {p.rsplit("/", 1)[-1] for p in result["pngs"]}
    assert names == {"fig7_filters.png", "fig7_pos_embed.png", "fig7_attention_distance.png",
                     "fig6_rollout.png", "curves.png"}
    page = open(result["html"], encoding="utf-8").read()
    embedded = _embedded_pngs(page)
    assert set(embedded) == names
    for url in result["pngs"]:  # the page embeds exactly the bytes of every PNG it lists
        data = open(url, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert embedded[url.rsplit("/", 1)[-1]] == data

    n = result["numbers"]
    assert set(n["pos_embed_distance_correlation"]) == {
        ft.run_id, f"parent {pre.run_id}", f"parent {pre.run_id} resampled to 6x6"}
    assert n["model"]["grid"] == [6, 6] and n["model"]["patch_size"] == 8
    ad = n["attention_distance"]
    assert len(ad["per_layer_mean"]) == 3
    assert all(0 <= v <= ad["max_possible"] for v in ad["per_layer_min"] + ad["per_layer_max"])
    assert n["rollout"]["images"] == ["astronaut", "coffee", "chelsea", "rocket"]
    assert n["training"][f"parent {pre.run_id}"]["steps"] == 30
    assert n["training"][ft.run_id]["final_top1"] == pytest.approx(0.5)
    assert n["eval"][ft.run_id]["top1"] == 0.75
    assert json.load(open(tmp_path / "runs" / ft.run_id / "report" / "numbers.json"))["eval"] == n["eval"]
    assert json.load(open(tmp_path / "runs" / ft.run_id / "report" / "eval.json"))["top1"] == 0.75  # untouched
    assert result["html"] in result["markdown"] and "| eval (" in result["markdown"]


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_inspect_cli_timm_file_to_s3_and_npz_with_own_images(tmp_path, s3):
    from PIL import Image
    from safetensors.torch import save_file
    import skimage.data

    from pipeline.cli import main
    from shards import storage
    from vit.interop import save_big_vision_npz, to_timm_state_dict

    torch.manual_seed(0)  # a registry shape: a bare weight file does not say num_heads
    model = vit.create_model("vit_tiny_patch16", num_classes=5, img_size=64)
    timm_file = tmp_path / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in to_timm_state_dict(model).items()}, str(timm_file))
    out = s3.url("inspect/timm")
    assert main(["inspect", str(timm_file), "--out", out, "--num-pcs", "8"]) == 0
    names = set(storage.listdir(out))
    assert {"report.html", "report.md", "numbers.json", "fig7_filters.png", "fig7_pos_embed.png",
            "fig7_attention_distance.png", "fig6_rollout.png"} <= names
    assert "curves.png" not in names  # a bare checkpoint has no metrics.csv
    numbers = storage.read_json(storage.join(out, "numbers.json"))
    assert len(numbers["filters"]["explained_top"]) == 8
    page = storage.read_bytes(storage.join(out, "report.html")).decode()
    assert _embedded_pngs(page)["fig7_filters.png"] == storage.read_bytes(storage.join(out, "fig7_filters.png"))

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(skimage.data.coffee()).save(photos / "b_coffee.png")
    Image.fromarray(skimage.data.chelsea()).save(photos / "a_cat.jpg")
    (photos / "notes.txt").write_text("not an image")
    npz = tmp_path / "vit_tiny.npz"
    save_big_vision_npz(model, npz)
    local_out = tmp_path / "npz_report"
    assert main(["inspect", str(npz), "--out", str(local_out), "--images", str(photos),
                 "--compare", str(timm_file)]) == 0
    numbers = json.load(open(local_out / "numbers.json"))
    assert numbers["rollout"]["images"] == ["a_cat.jpg", "b_coffee.png"]
    # same weights through two formats: identical pos-embed structure
    structure = list(numbers["pos_embed_distance_correlation"].values())
    assert len(structure) == 2 and structure[0] == pytest.approx(structure[1], abs=1e-4)


def test_inspect_cli_errors_are_one_line(tmp_path, capsys):
    from pipeline.cli import main

    model_file = tmp_path / "m.safetensors"
    from safetensors.torch import save_file
    from vit.interop import to_timm_state_dict

    save_file({k: v.contiguous() for k, v in to_timm_state_dict(tiny(32)).items()}, str(model_file))
    assert main(["inspect", str(model_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--out" in err and str(model_file) in err
    assert main(["inspect", str(model_file), "--out", str(tmp_path / "o"), "--images", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nope" in err
    assert not (tmp_path / "o" / "report.html").exists()


def test_bad_inputs_name_the_file(tmp_path):
    from vit.report import ReportError, load_photos, read_curves
    from vit.runs import RunFolder

    run = RunFolder(str(tmp_path))
    (tmp_path / "metrics.csv").write_text("iteration,loss\n1,2.0\n")
    with pytest.raises(ReportError, match=r"metrics\.csv: no 'step' column"):
        read_curves(run)
    (tmp_path / "metrics.csv").write_text("step,loss,lr,top1\n1,2.0,0.1,\n2,nan,0.1,0.5\n")
    assert read_curves(run) == {"loss": [(1.0, 2.0)], "top1": [(2.0, 0.5)], "lr": [(1.0, 0.1), (2.0, 0.1)]}
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ReportError, match=r"broken\.png: not a readable image"):
        load_photos(str(tmp_path), img_size=(32, 32))


def test_curves_have_labelled_axes_with_units():
    from vit.figures import draw_curves

    fig = draw_curves({"run": {"loss": [(1, 2.3), (2, 2.0)], "lr": [(1, 1e-3), (2, 5e-4)],
                               "images_per_sec": [(1, 100.0), (2, 110.0)], "mfu": [(1, 0.4), (2, 0.5)]}})
    labels = {ax.get_title(): (ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes}
    assert labels == {"loss": ("optimizer step", "training loss (nats)"),
                      "lr": ("optimizer step", "learning rate (per step)"),
                      "images_per_sec": ("optimizer step", "throughput (images/s, all ranks)"),
                      "mfu": ("optimizer step", "model FLOPs utilisation (fraction of peak)")}
