"""vit.data.gpu, the GPU decode path (data.decode: gpu), on this machine's CPU: everything but the
CUDA call (torchvision's decode_jpeg runs with device="cpu" here; device="cuda" is unverified on GPU).

The crop boxes and flips are the CPU path's from the same seeds, the resampling is PIL's, a batch is
decoded in one call, samples that are not JPEGs are decoded on the CPU, and `auto` picks the CPU
without CUDA.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import vit.augment as augment
from vit.augment import InceptionCrop, ResizeCenterCrop, open_image
from vit.data import TrainStream, gpu


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    from shards.testdata import photo_crops

    return photo_crops(1, size=(width, height), seed=seed)[0]


def _jpeg(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=kw.pop("quality", 90), **kw)
    return buf.getvalue()


def test_auto_picks_the_cpu_without_cuda():
    assert not torch.cuda.is_available()  # this machine: the test below would not say anything on a GPU host
    assert gpu.resolve_decode("auto") == "cpu" and gpu.resolve_decode("auto", cuda=True) == "gpu"
    assert gpu.resolve_decode("gpu") == "gpu" and gpu.resolve_decode("cpu", cuda=True) == "cpu"
    with pytest.raises(ValueError, match="data.decode='nvjpeg'"):
        gpu.resolve_decode("nvjpeg")
    from vit.config import ConfigError, DataConfig

    with pytest.raises(ConfigError, match="data.decode"):
        DataConfig(decode="nvjpeg")


def test_the_gpu_path_crops_the_cpu_paths_boxes_from_the_same_seeds(monkeypatch):
    """Both paths draw (box, flip) with transform.params from the sample's Generator: same boxes, same coin."""
    cpu_calls = []
    real = augment.crop_resize
    monkeypatch.setattr(augment, "crop_resize", lambda img, box, flip, *, size: cpu_calls.append((box, flip))
                        or real(img, box, flip, size=size))
    sizes = [(500, 375), (298, 224), (224, 336), (640, 480), (37, 91)]
    for transform in (InceptionCrop(img_size=224), InceptionCrop(img_size=64, scale=(0.25, 1), flip=False),
                      ResizeCenterCrop(img_size=224)):
        cpu_calls.clear()
        device_crops = []
        for seed in range(40):
            data = _jpeg(_photo(*sizes[seed % len(sizes)], seed=seed))
            transform(open_image(data), np.random.default_rng([7, seed]))
            item = gpu.prepare(data, open_image(data), transform=transform, rng=np.random.default_rng([7, seed]))
            assert isinstance(item, gpu.DeviceCrop) and item.data == data
            device_crops.append((item.box, item.flip))
        assert device_crops == cpu_calls
        if isinstance(transform, InceptionCrop) and transform.flip:
            assert 5 < sum(flip for _, flip in device_crops) < 35  # both sides of the coin were tested


def test_device_resampling_is_pils_bilinear_resize_of_the_box():
    """crop_resize_tensor on the same pixels as PIL: within 1 level (PIL rounds to 8 bits between its two
    passes), for shrinking, enlarging, fractional boxes and flips."""
    image = _photo(500, 375, seed=3)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    rng = np.random.default_rng(0)
    crop = InceptionCrop(img_size=224)
    boxes = [(0, 0, 500, 375), (10.5, 3.25, 400.75, 301.5), (100.3, 50.7, 160.9, 110.1)]
    boxes += [crop.params(500, 375, rng)[0] for _ in range(12)]
    for i, box in enumerate(boxes):
        for size, flip in ((224, i % 2 == 1), (37, False)):
            ours = gpu.crop_resize_tensor(pixels, box, flip, size=size).permute(1, 2, 0).numpy().astype(int)
            pil = image.resize((size, size), Image.BILINEAR, box=box)
            theirs = np.asarray(pil.transpose(Image.FLIP_LEFT_RIGHT) if flip else pil).astype(int)
            assert np.abs(ours - theirs).max() <= 1, (box, size, flip)


def test_finish_batch_decodes_jpegs_in_one_call_and_falls_back_to_the_cpu(monkeypatch):
    """One decode_jpeg call per batch; PNG / CMYK JPEG come as CPU pixels; a JPEG the device decoder refuses
    is decoded on the CPU with the same crop; one nothing can decode is reported."""
    import torchvision.io

    calls = []
    real = torchvision.io.decode_jpeg
    monkeypatch.setattr(torchvision.io, "decode_jpeg", lambda data, **kw: calls.append(data) or real(data, **kw))
    transform = InceptionCrop(img_size=32)
    photo = _photo(120, 90, seed=1)
    datas = [_jpeg(photo), _jpeg(photo.convert("L")), _jpeg(photo.convert("CMYK")), b"", _jpeg(_photo(64, 80, seed=2))]
    png = io.BytesIO()
    photo.save(png, "PNG")
    datas[3] = png.getvalue()
    items = [gpu.prepare(d, open_image(d), transform=transform, rng=np.random.default_rng(i)) for i, d in enumerate(datas)]
    assert [type(i).__name__ for i in items] == ["DeviceCrop", "DeviceCrop", "Tensor", "Tensor", "DeviceCrop"]
    images, bad = gpu.finish_batch(items, size=32, device="cpu")
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.uint8 and bad == []
    assert len(calls) == 1 and isinstance(calls[0], list) and len(calls[0]) == 3  # the three JPEGs, one call
    for i in (2, 3):  # the CPU path's pixels, unchanged
        assert torch.equal(images[i], items[i].permute(2, 0, 1))
    # a JPEG cut after its header: the batch call fails, each is retried alone, then on the CPU; reported
    cut = gpu.DeviceCrop(data=datas[0][:400], box=(0, 0, 120, 90), flip=False)
    calls.clear()
    images2, bad = gpu.finish_batch([items[0], cut, items[4]], size=32, device="cpu")
    assert bad == [1] and len(calls) == 4  # the batch, then the three one by one
    assert torch.equal(images2[0], images[0]) and torch.equal(images2[2], images[4])


def test_an_undecodable_row_takes_its_batch_neighbour_and_is_counted():
    from vit.data.streams import _fill_undecodable

    images = torch.arange(4).view(4, 1, 1, 1).repeat(1, 3, 2, 2).to(torch.uint8)
    keys, labels = ["a", "b", "c", "d"], [[0], [1], [2], [3]]
    corrupt = _fill_undecodable(images, keys, labels, [0, 2])
    assert [k for k, _ in corrupt] == ["a", "c"]
    assert keys == ["b", "b", "b", "d"] and labels == [[1], [1], [1], [3]]
    assert images[:, 0, 0, 0].tolist() == [1, 1, 1, 3]
    from shards.format import DatasetError

    with pytest.raises(DatasetError, match="none of the 2 images"):
        _fill_undecodable(images[:2], ["a", "b"], [[0], [1]], [0, 1])


def _photo_dataset(root, sizes=(20,) * 8):
    """Shards of real photo crops: JPEGs (some greyscale), and every fifth sample a PNG."""
    import hashlib

    import webdataset as wds

    from shards.testdata import photo_crops

    crops = iter(photo_crops(sum(sizes), size=(150, 112), seed=5))
    root.mkdir(parents=True)
    entries = []
    for s, n in enumerate(sizes):
        name = f"data-{s:06d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for i in range(n):
                image = next(crops)
                ext = "png" if i % 5 == 0 else "jpg"
                buf = io.BytesIO()
                (image.convert("L") if i % 7 == 3 else image).save(buf, "PNG" if ext == "png" else "JPEG", quality=92)
                sink.write({"__key__": f"s{s}_{i:03d}", ext: buf.getvalue(), "cls": str(i % 3).encode()})
        data = (root / name).read_bytes()
        entries.append({"name": name, "samples": n, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"name": "photos", "shards": entries, "num_samples": sum(sizes), "classes": ["a", "b", "c"],
                "label_histogram": [0, 0, 0], "multi_label": False, "source": {"kind": "test", "url": "x",
                "fingerprint": "x"}, "settings": {}, "skipped": [], "dropped": {}, "created": "2026-01-01T00:00:00Z"}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.mark.parametrize("augment_kind", ["pretrain", "none"])
def test_train_stream_on_the_gpu_path_matches_the_cpu_path(tmp_path, augment_kind):
    """The whole GPU path on CPU tensors: same keys, targets and order as the CPU path; PNGs identical,
    JPEGs as close as two decoders of the same file at crops the CPU path decodes at full scale."""
    root = _photo_dataset(tmp_path / "photos")
    # 96 px out of 150x112 photos: no crop is 2 x 96 wide, so the CPU path never decodes at a reduced scale
    kw = dict(img_size=96, global_batch_size=16, rank=0, world_size=1, lanes=8, seed=2, augment=augment_kind)
    on_cpu = list(TrainStream(str(root), num_workers=0, **kw).batches(0))
    stream = TrainStream(str(root), num_workers=1, decode="gpu", device="cpu", **kw)
    assert stream.decode == "gpu"
    on_device = list(stream.batches(0))
    assert [b.keys for b in on_device] == [b.keys for b in on_cpu] and len(on_cpu) == 10
    assert all(torch.equal(a.targets, b.targets) for a, b in zip(on_device, on_cpu))
    diffs = []
    for a, b in zip(on_device, on_cpu):
        assert a.images.dtype == torch.uint8 and a.images.shape == b.images.shape
        for key, x, y in zip(a.keys, a.images, b.images):
            if key.endswith(("_000", "_005", "_010", "_015")):  # the PNGs: decoded on the CPU either way
                assert torch.equal(x, y), key
            else:
                diffs.append((x.int() - y.int()).abs().float().mean().item())
    # measured: max 0.20, mean 0.15 levels (rounding: PIL's 8-bit intermediate pass), both augmentations
    assert max(diffs) < 0.4 and np.mean(diffs) < 0.25, (max(diffs), np.mean(diffs))
    assert stream.corrupt == []
