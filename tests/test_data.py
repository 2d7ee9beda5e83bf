"""vit.data: the deterministic, elastic training stream and the exactly-once eval stream.

Datasets are written here with the stock ``webdataset.TarWriter`` + a manifest.json, with
deliberately uneven shard sizes; ranks are simulated in-process (``rank=r``).
"""
from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from vit.data import EvalStream, Segment, ShardInfo, TrainStream, iter_lane, slice_stream, to_device, window_order

SHARD_SIZES = [37, 50, 13, 61, 44, 29, 50, 8, 70, 33]  # 395 samples, uneven on purpose
NUM_CLASSES = 5


def _image_bytes(rng: np.random.Generator, fmt: str) -> bytes:
    h, w = rng.integers(10, 24, size=2)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def write_dataset(root: Path, sizes=SHARD_SIZES, *, multi_label=False, bad: dict | None = None,
                  truncate_shard: int | None = None, seed: int = 0) -> tuple[Path, dict[str, list[int]]]:
    """Shards + manifest; returns (root, {key: labels}). ``bad`` maps key -> 'image' | 'label'."""
    bad = bad or {}
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    labels_of, entries, hist = {}, [], [0] * NUM_CLASSES
    for s, n in enumerate(sizes):
        name = f"data-{s:06d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for i in range(n):
                key = f"s{s:02d}_{i:03d}"
                if multi_label:
                    labels = sorted(rng.choice(NUM_CLASSES, size=int(rng.integers(1, 4)), replace=False).tolist())
                else:
                    labels = [int(rng.integers(NUM_CLASSES))]
                sample = {"__key__": key, "jpg" if i % 2 else "png": _image_bytes(rng, "JPEG" if i % 2 else "PNG"),
                          "json": json.dumps({"labels": labels, "classes": [f"c{x}" for x in labels]}).encode()}
                if not multi_label:
                    sample["cls"] = str(labels[0]).encode()
                if bad.get(key) == "image":
                    sample["jpg" if i % 2 else "png"] = b"not an image at all"
                if bad.get(key) == "label":
                    sample["cls"] = b"banana"
                    sample["json"] = b"{broken"
                sink.write(sample)
                labels_of[key] = labels
                for x in labels:
                    hist[x] += 1
        data = (root / name).read_bytes()
        if truncate_shard == s:
            data = data[: len(data) // 2]
            (root / name).write_bytes(data)
        entries.append({"name": name, "samples": n, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {
        "name": "data", "shards": entries, "num_samples": sum(sizes), "classes": [f"c{i}" for i in range(NUM_CLASSES)],
        "label_histogram": hist, "multi_label": multi_label,
        "source": {"kind": "test", "url": str(root), "fingerprint": "x"}, "settings": {}, "skipped": [],
        "dropped": {}, "created": "2026-01-01T00:00:00Z",
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root, labels_of


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "ds")


def run_epoch(url, *, world_size, num_workers, epoch=0, start_step=0, stop_step=None, **kw):
    """Global view of an epoch: {step: {key: image tensor}} over all ranks, plus per-rank step counts."""
    kw = {"img_size": 8, "global_batch_size": 16, "seed": 3, "lanes": 8, "shuffle_buffer": 20} | kw
    steps: dict[int, dict[str, torch.Tensor]] = {}
    counts, streams = [], []
    for rank in range(world_size):
        stream = TrainStream(str(url), rank=rank, world_size=world_size, num_workers=num_workers, **kw)
        streams.append(stream)
        n = 0
        for batch in stream.batches(epoch, start_step=start_step):
            if stop_step is not None and batch.step >= stop_step:
                break
            assert batch.images.shape == (stream.local_batch_size, 3, 8, 8)
            assert batch.images.dtype == torch.uint8  # normalised on the device (vit.data.to_device)
            assert len(batch.keys) == stream.local_batch_size == batch.targets.shape[0]
            merged = steps.setdefault(batch.step, {})
            for key, image in zip(batch.keys, batch.images):
                assert key not in merged, f"{key} twice in step {batch.step}"
                merged[key] = image
            n += 1
        counts.append(n)
    return steps, counts, streams


def test_order_is_independent_of_ranks_and_workers(dataset):
    root, _ = dataset
    reference, counts, streams = run_epoch(root, world_size=1, num_workers=0)
    stream = streams[0]
    assert stream.steps_per_epoch == (395 // 8) // 2 == 24
    assert stream.dropped_per_epoch == 395 - 24 * 16
    assert counts == [24]
    all_keys = [k for step in reference.values() for k in step]
    assert len(all_keys) == len(set(all_keys)) == 24 * 16  # no sample twice in an epoch
    for world_size, num_workers in [(1, 2), (2, 0), (2, 1), (4, 2), (8, 1)]:
        steps, counts, _ = run_epoch(root, world_size=world_size, num_workers=num_workers)
        assert counts == [24] * world_size, (world_size, num_workers)  # every rank the same number of steps
        assert steps.keys() == reference.keys()
        for s in reference:
            assert steps[s].keys() == reference[s].keys(), (world_size, num_workers, s)
            for key, image in reference[s].items():  # same augmentation too
                assert torch.equal(steps[s][key], image), (world_size, num_workers, s, key)


def test_epochs_differ_and_each_covers_distinct_samples(dataset):
    root, _ = dataset
    e0, _, _ = run_epoch(root, world_size=1, num_workers=0, epoch=0)
    e1, _, _ = run_epoch(root, world_size=1, num_workers=0, epoch=1)
    order0 = [sorted(e0[s]) for s in sorted(e0)]
    order1 = [sorted(e1[s]) for s in sorted(e1)]
    assert order0 != order1
    assert len({k for s in e1.values() for k in s}) == 24 * 16
    other_seed, _, _ = run_epoch(root, world_size=1, num_workers=0, epoch=0, seed=4)
    assert [sorted(other_seed[s]) for s in sorted(other_seed)] != order0


def test_resume_on_fewer_ranks_continues_the_epoch(dataset):
    root, _ = dataset
    full, _, _ = run_epoch(root, world_size=1, num_workers=0, epoch=2)
    k = 9
    first, counts, _ = run_epoch(root, world_size=2, num_workers=1, epoch=2, stop_step=k)
    assert counts == [k, k] and sorted(first) == list(range(k))
    rest, counts, streams = run_epoch(root, world_size=1, num_workers=2, epoch=2, start_step=k)
    assert counts == [24 - k] and sorted(rest) == list(range(k, 24))
    seen = Counter(key for part in (first, rest) for step in part.values() for key in step)
    assert max(seen.values()) == 1  # no sample repeated
    assert set(seen) == {key for step in full.values() for key in step}  # none skipped
    for s in range(24):  # and it is exactly the uninterrupted epoch, sample for sample
        got = (first if s < k else rest)[s]
        assert got.keys() == full[s].keys()
        assert all(torch.equal(got[key], full[s][key]) for key in got)
    state = streams[0].state(epoch=2, step=k)
    assert state == {"epoch": 2, "step": k, "seed": 3, "lanes": 8, "shuffle_buffer": 20}
    streams[0].check_resume(state)
    with pytest.raises(ValueError, match="lanes=8"):
        streams[0].check_resume(state | {"lanes": 4})


def test_resume_skips_without_decoding(dataset, monkeypatch):
    import vit.data.streams as data

    root, _ = dataset
    decoded = []
    real = data.decode_sample
    monkeypatch.setattr(data, "decode_sample", lambda sample, **kw: decoded.append(sample["__key__"]) or real(sample, **kw))
    stream = TrainStream(str(root), img_size=8, global_batch_size=16, rank=0, world_size=1, num_workers=0, seed=3,
                         shuffle_buffer=20)
    batches = list(stream.batches(0, start_step=20))
    assert [b.step for b in batches] == [20, 21, 22, 23]
    assert len(decoded) == 4 * 16  # only the emitted samples were decoded


def test_single_label_targets_and_prior(dataset):
    root, labels_of = dataset
    stream = TrainStream(str(root), img_size=8, global_batch_size=16, rank=0, world_size=1, num_workers=0)
    assert not stream.multi_label and stream.num_classes == NUM_CLASSES
    batch = next(stream.batches(0))
    assert batch.targets.dtype == torch.long and batch.targets.shape == (16,)
    assert batch.targets.tolist() == [labels_of[k][0] for k in batch.keys]
    hist = json.loads((root / "manifest.json").read_text())["label_histogram"]
    assert torch.allclose(stream.label_prior, torch.tensor(hist, dtype=torch.float32) / sum(hist))
    # uint8 leave the stream; to_device maps pixels to [-1, 1] (mean = std = 0.5)
    images = to_device(batch.images, device="cpu")
    assert images.min() >= -1.0 and images.max() <= 1.0 and images.min() < -0.5


def test_multi_label_targets_are_multi_hot(tmp_path):
    root, labels_of = write_dataset(tmp_path / "ml", multi_label=True)
    stream = TrainStream(str(root), img_size=8, global_batch_size=16, rank=1, world_size=2, num_workers=1)
    assert stream.multi_label
    batch = next(stream.batches(0))
    assert batch.targets.dtype == torch.float32 and batch.targets.shape == (8, NUM_CLASSES)
    for key, row in zip(batch.keys, batch.targets):
        assert torch.nonzero(row).flatten().tolist() == labels_of[key]
    manifest = json.loads((root / "manifest.json").read_text())
    expected = torch.tensor(manifest["label_histogram"], dtype=torch.float32) / manifest["num_samples"]
    assert torch.allclose(stream.label_prior, expected)
    with pytest.raises(ValueError, match="multi_label"):
        TrainStream(str(root), img_size=8, global_batch_size=16, rank=0, world_size=1, label_mode="softmax")
    # single-label data can be trained with a sigmoid head: one-hot targets
    single, labels1 = write_dataset(tmp_path / "sl", sizes=[20] * 8)
    b = next(TrainStream(str(single), img_size=8, global_batch_size=8, rank=0, world_size=1, num_workers=0,
                         label_mode="sigmoid").batches(0))
    assert b.targets.shape == (8, NUM_CLASSES) and b.targets.sum(1).tolist() == [1.0] * 8


def test_corrupt_samples_are_skipped_counted_and_ranks_stay_in_step(tmp_path):
    bad = {"s01_004": "image", "s03_010": "label", "s05_001": "image"}
    root, labels_of = write_dataset(tmp_path / "bad", bad=bad, truncate_shard=8)  # shard 8 (70 samples) cut in half
    kw = dict(img_size=8, global_batch_size=16, seed=0, lanes=8, shuffle_buffer=20)
    # which samples of the epoch the stream uses (the permuted stream minus its dropped tail)
    plan = TrainStream(str(root), rank=0, world_size=1, num_workers=0, **kw).plan
    used = {f"s{int(seg.url[-10:-4]):02d}_{seg.first + i:03d}" for lane in range(8)
            for seg in plan.lane_segments(0, lane) for i in range(seg.count)}
    assert set(bad) <= used and sum(k.startswith("s08_") for k in used) == 70  # the test needs them in play
    per_rank = []
    for rank in range(2):
        stream = TrainStream(str(root), rank=rank, world_size=2, num_workers=1, **kw)
        per_rank.append((stream, list(stream.batches(0))))
    assert [len(batches) for _, batches in per_rank] == [24, 24]  # every rank the same steps
    for _, batches in per_rank:
        assert all(b.images.shape[0] == 8 and torch.isfinite(b.images).all() for b in batches)
    corrupt = [key for stream, _ in per_rank for key, _ in stream.corrupt]
    assert len(corrupt) == len(set(corrupt))
    emitted = Counter(k for _, batches in per_rank for b in batches for k in b.keys)
    assert sum(emitted.values()) == 24 * 16
    # the broken samples are counted and never reach the model
    assert set(bad) <= set(corrupt) and not set(bad) & set(emitted)
    # the truncated shard: an intact prefix is read, the rest is counted by shard and index
    intact = sorted(k for k in used if k.startswith("s08_") and k in emitted)
    tail = sorted(k for k in corrupt if k.startswith("data-000008.tar#"))
    assert 0 < len(intact) < 70 and len(intact) + len(tail) == 70
    assert intact == [f"s08_{i:03d}" for i in range(len(intact))]
    assert tail == [f"data-000008.tar#{i}" for i in range(len(intact), 70)]
    assert len(corrupt) == len(bad) + len(tail)
    # every usable sample appears; the filled slots are duplicates of good neighbours
    assert set(emitted) == used - set(bad) - {f"s08_{i:03d}" for i in range(len(intact), 70)}
    assert sum(emitted.values()) - len(emitted) == len(corrupt)


def test_clear_errors_for_impossible_settings(dataset, tmp_path):
    root, _ = dataset
    from shards.errors import VitpipeError
    from shards.format import DatasetError
    from vit.data import StreamError

    with pytest.raises(StreamError, match="multiple of 8") as err:  # a VitpipeError: one line, exit 2 (bad input)
        TrainStream(str(root), img_size=8, global_batch_size=12, rank=0, world_size=1)
    assert isinstance(err.value, VitpipeError) and err.value.exit_code == 2
    with pytest.raises(StreamError, match="lanes 8 is not a multiple of world_size 3"):
        TrainStream(str(root), img_size=8, global_batch_size=16, rank=0, world_size=3)
    # more workers than the rank has lanes: clamped (workers never change the order)
    assert TrainStream(str(root), img_size=8, global_batch_size=16, rank=0, world_size=4, num_workers=3).num_workers == 2
    few, _ = write_dataset(tmp_path / "few", sizes=[30, 30, 30])
    with pytest.raises(StreamError, match="shard-size"):
        TrainStream(str(few), img_size=8, global_batch_size=16, rank=0, world_size=1)
    with pytest.raises(DatasetError, match="no manifest.json; a dataset without a manifest does not exist"):
        TrainStream(str(tmp_path / "nothing"), img_size=8, global_batch_size=16, rank=0, world_size=1)


def test_resume_does_not_open_shards_it_has_passed(tmp_path):
    root, _ = write_dataset(tmp_path / "even", sizes=[10] * 10)
    shards = [ShardInfo(url=str(root / f"data-{i:06d}.tar"), samples=10) for i in range(10)]
    segments = slice_stream(shards, 5, 100)  # a lane starting inside shard 0
    assert segments[0] == Segment(shards[0].url, 5, 5) and len(segments) == 10
    order = window_order(95, 4, np.random.default_rng(1))
    opened = []

    def open_fn(url):
        opened.append(Path(url).name)
        return open(url, "rb")

    got = list(iter_lane(segments, order, 80, 95, open_fn=open_fn))
    assert [j for j, _ in got] == list(range(80, 95))
    assert [s["__key__"] for _, s in got] == [f"s{(5 + r) // 10:02d}_{(5 + r) % 10:03d}" for r in order[80:95]]
    assert opened == ["data-000008.tar", "data-000009.tar"]  # raw index >= 76 only: shards 0..7 never opened


def test_a_stream_that_drops_mid_shard_is_reopened_at_the_same_sample(tmp_path):
    """A network stream failing mid-shard (simulated: no test can cut a real connection at byte N)."""
    from shards.storage import StorageError

    from vit.data import read_segment

    root, _ = write_dataset(tmp_path / "one", sizes=[30])
    url = str(root / "data-000000.tar")
    opens = []

    class Dropping(io.RawIOBase):
        def __init__(self, f, limit):
            self.f, self.left = f, limit

        def readable(self):
            return True

        def readinto(self, buffer):
            if self.left <= 0:
                raise StorageError(f"{url}: connection reset")
            data = self.f.read(min(len(buffer), self.left))
            self.left -= len(data)
            buffer[: len(data)] = data
            return len(data)

    def open_fn(u):
        opens.append(u)
        limit = [20_000, 45_000][len(opens) - 1] if len(opens) <= 2 else 10**9
        return io.BufferedReader(Dropping(open(u, "rb"), limit), buffer_size=4096)

    got = list(read_segment(Segment(url, 3, 25), keep=lambda i: i % 2 == 0, open_fn=open_fn))
    assert len(opens) == 3  # dropped twice, finished on the third stream
    assert [i for i, _ in got] == list(range(0, 25, 2))
    assert [s["__key__"] for _, s in got] == [f"s00_{3 + i:03d}" for i in range(0, 25, 2)]
    assert all("__error__" not in s for _, s in got)


def test_window_order_is_a_bounded_permutation():
    order = window_order(1000, 50, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(1000))
    assert np.abs(order - np.arange(1000)).max() < 50
    assert (order != np.arange(1000)).mean() > 0.9


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 2), (3, 1)])
def test_eval_stream_sees_every_sample_exactly_once(dataset, world_size, num_workers):
    root, labels_of = dataset
    seen = Counter()
    for rank in range(world_size):
        stream = EvalStream(str(root), img_size=8, batch_size=32, rank=rank, world_size=world_size,
                            num_workers=num_workers)
        for batch in stream:
            assert batch.images.shape[1:] == (3, 8, 8) and batch.images.shape[0] <= 32
            assert batch.targets.tolist() == [labels_of[k][0] for k in batch.keys]
            seen.update(batch.keys)
    assert seen == Counter(labels_of.keys())


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_reads_shards_from_s3(dataset, s3):
    from shards import storage

    root, _ = dataset
    url = s3.url("data-test/ds")
    storage.copy_tree(str(root), url)
    local, _, _ = run_epoch(root, world_size=1, num_workers=0, stop_step=6)
    remote, counts, _ = run_epoch(url, world_size=2, num_workers=1, stop_step=6)
    assert counts == [6, 6]
    assert {s: set(v) for s, v in remote.items()} == {s: set(v) for s, v in local.items()}
    seen = Counter(k for b in EvalStream(url, img_size=8, batch_size=64, rank=0, world_size=1) for k in b.keys)
    assert len(seen) == 395 and max(seen.values()) == 1


def test_digits_shards_train_and_eval(digits_shards):
    """The project's real fixture (sklearn digits via `shards.shard_dataset`): labels match, counts exact."""
    seen = Counter()
    for rank in range(2):
        stream = TrainStream(digits_shards, img_size=16, global_batch_size=64, rank=rank, world_size=2,
                             num_workers=1, augment="finetune")
        assert stream.num_classes == 10 and not stream.multi_label
        assert stream.steps_per_epoch == (1797 // 8) // 8
        n = 0
        for batch in stream.batches(1):
            assert batch.images.shape == (32, 3, 16, 16)
            assert batch.targets.tolist() == [int(k.split("_")[0]) for k in batch.keys]  # keys are "<class>_digit_N"
            seen.update(batch.keys)
            n += 1
        assert n == stream.steps_per_epoch
    assert len(seen) == stream.steps_per_epoch * 64 and max(seen.values()) == 1
    eval_seen = Counter()
    for rank in range(2):
        for batch in EvalStream(digits_shards, img_size=16, batch_size=100, rank=rank, world_size=2, num_workers=1):
            assert batch.targets.tolist() == [int(k.split("_")[0]) for k in batch.keys]
            eval_seen.update(batch.keys)
    assert len(eval_seen) == 1797 and max(eval_seen.values()) == 1


def test_transforms_crop_where_they_say():
    from vit.augment import InceptionCrop, ResizeCenterCrop, inception_crop_box, open_image

    # a 300x100 image: black | grey | white thirds; the centre crop must be the grey square
    arr = np.zeros((100, 300, 3), dtype=np.uint8)
    arr[:, 100:200], arr[:, 200:] = 128, 255
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    out = ResizeCenterCrop(img_size=20, crop_pct=1.0)(open_image(buf.getvalue()))
    assert out.shape == (20, 20, 3) and np.all(out[:, 1:-1] == 128)  # edge pixels blend across the box (filter support)
    # crop boxes stay inside the image and cover 5%..100% of it
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = inception_crop_box(300, 100, rng, scale=(0.05, 1.0), ratio=(3 / 4, 4 / 3))
        assert 0 <= left < right <= 300 and 0 <= top < bottom <= 100
        assert 0.05 * 0.999 <= (right - left) * (bottom - top) / 30000 <= 1.0
    # same generator state -> same crop; a big JPEG decoded at reduced scale (draft) matches a full decode
    photo = np.clip(np.add.outer(np.arange(600), np.arange(800)) // 6, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(photo).convert("RGB").save(buf, format="JPEG", quality=95)
    crop = InceptionCrop(img_size=32, scale=(0.9, 1.0), flip=False)
    a = crop(open_image(buf.getvalue()), np.random.default_rng(5))
    b = crop(open_image(buf.getvalue()), np.random.default_rng(5))
    assert np.array_equal(a, b) and a.shape == (32, 32, 3)
    full = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    box = inception_crop_box(800, 600, np.random.default_rng(5), scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3))
    reference = np.asarray(full.resize((32, 32), Image.BILINEAR, box=box))
    assert np.abs(a.astype(int) - reference.astype(int)).mean() < 3


def test_a_truncated_member_ends_its_shard_with_counted_samples(tmp_path):
    """A shard whose last member's data is cut: the samples before it are read, the rest yielded as errors."""
    from vit.data import read_segment

    root, _ = write_dataset(tmp_path / "cut", sizes=[12])
    path = root / "data-000000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    for keep in (lambda i: True, lambda i: i % 3 == 0):
        for stream_kind in ("seekable", "stream"):
            def open_fn(url, kind=stream_kind):
                f = open(url, "rb")
                return f if kind == "seekable" else io.BufferedReader(io.BytesIO(f.read()), buffer_size=4096)

            got = list(read_segment(Segment(str(path), 0, 12), keep=keep, open_fn=open_fn))
            assert [i for i, _ in got] == [i for i in range(12) if keep(i)]  # every kept index exactly once
            good = [s["__key__"] for _, s in got if "__error__" not in s]
            errors = [s["__key__"] for _, s in got if "__error__" in s]
            assert good and errors and good == [f"s00_{i:03d}" for i in range(12) if keep(i)][: len(good)]
            assert errors == [f"data-000000.tar#{i}" for i in range(12) if keep(i)][len(good):]


def test_workers_fork_with_the_parents_objects_frozen_out_of_their_gc(dataset, monkeypatch):
    """Workers start under gc.freeze() (their GC does not walk, and so copy, the parent's heap);
    the parent is unfrozen again right after, and the batches are the same as without workers."""
    import gc

    from torch.utils.data import DataLoader

    root, _ = dataset
    frozen_at_fork = []
    real_iter = DataLoader.__iter__
    monkeypatch.setattr(DataLoader, "__iter__", lambda self: frozen_at_fork.append(gc.get_freeze_count()) or real_iter(self))
    kw = dict(img_size=8, global_batch_size=16, rank=0, world_size=1, seed=3, shuffle_buffer=20)
    with_workers = list(TrainStream(str(root), num_workers=2, **kw).batches(0, start_step=20))
    evaluated = list(EvalStream(str(root), img_size=8, batch_size=64, num_workers=1))
    assert len(frozen_at_fork) == 2 and min(frozen_at_fork) > 1000
    assert gc.get_freeze_count() == 0
    without = list(TrainStream(str(root), num_workers=0, **kw).batches(0, start_step=20))
    assert [b.keys for b in with_workers] == [b.keys for b in without]
    assert all(torch.equal(a.images, b.images) for a, b in zip(with_workers, without))
    assert sum(len(b.keys) for b in evaluated) == 395


def test_uint8_batches_normalised_on_the_device_equal_the_old_float_path(dataset):
    """The float batches the stream used to build on the CPU (normalise, then .to(device, dtype)) are what
    to_device makes of the uint8 batch, to the bit, in float32 and in bf16."""
    from vit.augment import INCEPTION_MEAN, INCEPTION_STD

    root, _ = dataset
    batch = next(TrainStream(str(root), img_size=8, global_batch_size=16, rank=0, world_size=1, num_workers=0,
                             seed=3).batches(0))
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (16, 3, 8, 8)
    assert batch.images.is_contiguous(memory_format=torch.channels_last)  # the HWC pixels as decoded: no transpose
    contiguous = batch.images.contiguous()
    mean, std = torch.tensor(INCEPTION_MEAN).view(1, 3, 1, 1), torch.tensor(INCEPTION_STD).view(1, 3, 1, 1)
    old = contiguous.to(torch.float32).mul_(1 / (255 * std)).sub_(mean / std)  # the former CPU path
    for dtype in (torch.float32, torch.bfloat16):
        new = to_device(batch.images, device="cpu", dtype=dtype)
        assert new.dtype == dtype and torch.equal(new, old.to(dtype))
    assert torch.allclose(to_device(batch.images, device="cpu"), contiguous.float() / 127.5 - 1, atol=1e-6)


def test_batches_are_pinned_only_when_cuda_is_present(dataset, monkeypatch):
    """Pinned memory is asked for only with CUDA (pinning needs it; the pinned copy itself is unverified on
    GPU): with CUDA faked, every batch allocation and target tensor asks for page-locked memory."""
    import vit.data.streams as streams

    root, _ = dataset
    kw = dict(img_size=8, global_batch_size=16, rank=0, world_size=1, seed=3, shuffle_buffer=20)
    plain = list(TrainStream(str(root), num_workers=2, **kw).batches(0, start_step=20))
    assert not TrainStream(str(root), num_workers=0, **kw).pin_memory
    assert not any(b.images.is_pinned() or b.targets.is_pinned() for b in plain)
    asked = []
    real_empty = streams._empty_batch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(streams, "_empty_batch", lambda *a, pin: asked.append(("images", pin)) or real_empty(*a, pin=False))
    monkeypatch.setattr(streams, "_maybe_pinned", lambda t, pin: asked.append(("targets", pin)) or t)
    faked = TrainStream(str(root), num_workers=2, **kw)
    assert faked.pin_memory
    pinned = list(faked.batches(0, start_step=20))
    assert asked == [("images", True), ("targets", True)] * 4
    assert all(torch.equal(a.images, b.images) and a.keys == b.keys for a, b in zip(pinned, plain))


def test_one_worker_lends_its_ring_buffers_and_never_overwrites_a_batch_the_consumer_holds(dataset, monkeypatch):
    """One worker, 24 steps, a ring of 5 shared buffers. A consumer that drops each batch gets the buffers
    themselves (no copy), reused all epoch; one that keeps every batch gets the first two lent and copies
    after that, and at the end of the epoch every batch still equals the in-process one."""
    import vit.data.streams as streams

    rings = []

    class Recorded(streams._ChunkRing):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            rings.append(self)

    monkeypatch.setattr(streams, "_ChunkRing", Recorded)
    root, _ = dataset
    kw = dict(img_size=8, global_batch_size=16, rank=0, world_size=1, seed=3, shuffle_buffer=20)
    plain = list(TrainStream(str(root), num_workers=0, **kw).batches(0))

    def in_ring(batch) -> bool:
        lo = rings[-1].buffers.ctypes.data
        return lo <= batch.images.data_ptr() < lo + rings[-1].buffers.nbytes

    where = []
    for batch, expected in zip(TrainStream(str(root), num_workers=1, **kw).batches(0), plain, strict=True):
        assert batch.keys == expected.keys and torch.equal(batch.images, expected.images)
        assert in_ring(batch)
        where.append(batch.images.data_ptr())
    assert rings[-1].buffers.shape == (5, 16, 8, 8, 3) and len(set(where)) <= 5

    held = list(TrainStream(str(root), num_workers=1, **kw).batches(0))
    assert [in_ring(b) for b in held] == [True, True] + [False] * 22
    for a, b in zip(held, plain, strict=True):
        assert a.keys == b.keys and torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert rings[-1].lent == {0, 1}
    del held
    assert rings[-1].lent == set() and sorted(rings[-1].returned) == [0, 1]


def _only_worker():
    import multiprocessing

    (worker,) = multiprocessing.active_children()
    return worker


def test_a_killed_worker_ends_the_epoch_with_an_error_not_a_hang(dataset):
    import os
    import signal

    root, _ = dataset
    batches = TrainStream(str(root), img_size=8, global_batch_size=16, rank=0, world_size=1, seed=3,
                          num_workers=1).batches(0)
    next(batches)
    worker = _only_worker()
    with pytest.raises(RuntimeError, match=f"worker \\(pid.*{worker.pid}"):
        os.kill(worker.pid, signal.SIGKILL)
        for _ in batches:
            pass
    worker.join(10)
    assert not worker.is_alive()


def test_ctrl_c_stops_the_worker_and_the_rank_promptly(dataset):
    """Ctrl-C reaches every process of the foreground group: the worker leaves quietly (the DataLoader's
    rule), the rank's KeyboardInterrupt closes the epoch, and nothing is left running."""
    import os
    import signal
    import time

    root, _ = dataset
    batches = TrainStream(str(root), img_size=8, global_batch_size=16, rank=0, world_size=1, seed=3,
                          num_workers=1).batches(0)
    with pytest.raises(KeyboardInterrupt):
        for step, _ in enumerate(batches):
            if step == 2:
                worker = _only_worker()
                os.kill(worker.pid, signal.SIGINT)
                raise KeyboardInterrupt
    start = time.monotonic()
    batches.close()
    worker.join(10)
    assert not worker.is_alive() and time.monotonic() - start < 10


def test_a_worker_that_read_an_epoch_to_its_end_reads_on_into_the_next_with_its_ring(dataset, monkeypatch):
    """One stream, 1 worker, epochs 0, 1, 2 read in a row (as vit.train's batches_from does): one worker
    forked and one ring mapped for all three, and every batch equals that of a new in-process stream at
    that epoch (the same samples, crops and flips). An epoch started elsewhere than where the kept worker
    stands, or left before its end, forks a new worker; ``close()`` stops the kept one. Two workers are
    kept alike."""
    import vit.data.streams as streams

    rings, forks = [], []

    class Recorded(streams._ChunkRing):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            rings.append(self)

    real_start = streams._start_workers
    monkeypatch.setattr(streams, "_ChunkRing", Recorded)
    monkeypatch.setattr(streams, "_start_workers", lambda loader: forks.append(loader) or real_start(loader))
    root, _ = dataset
    kw = dict(img_size=8, global_batch_size=16, rank=0, world_size=1, seed=3, shuffle_buffer=20)

    def same(got, epoch, start_step=0):
        expected = list(TrainStream(str(root), num_workers=0, **kw).batches(epoch, start_step=start_step))
        assert len(got) == len(expected) > 0
        assert all(a.keys == b.keys and a.step == b.step and torch.equal(a.images, b.images)
                   and torch.equal(a.targets, b.targets) for a, b in zip(got, expected))

    stream = TrainStream(str(root), num_workers=1, **kw)
    pids = []
    for epoch in range(3):
        got = []
        for batch in stream.batches(epoch):
            got.append(batch._replace(images=batch.images.clone()))  # the ring's buffer goes back to the worker
            pids.append(_only_worker().pid)
        same(got, epoch)
    assert len(forks) == 1 and len(rings) == 1 and len(set(pids)) == 1
    assert _only_worker().is_alive()  # kept for epoch 3, reading ahead
    assert list(stream.batches(2, start_step=stream.steps_per_epoch)) == [] and len(forks) == 1  # empty: kept

    # epoch 3 from step 5: not where the kept worker stands (epoch 3, step 0): it stops, a new one starts
    kept = _only_worker()
    same([b._replace(images=b.images.clone()) for b in stream.batches(3, start_step=5)], 3, start_step=5)
    kept.join(10)
    assert not kept.is_alive() and len(forks) == 2 and len(rings) == 2

    # an epoch left early keeps nothing: epoch 4 forks again
    batches = stream.batches(4)
    next(batches)
    left = _only_worker()
    batches.close()
    left.join(10)
    assert not left.is_alive()
    same([b._replace(images=b.images.clone()) for b in stream.batches(4)], 4)
    assert len(forks) == 3
    last = _only_worker()
    stream.close()
    last.join(10)
    assert not last.is_alive()

    two = TrainStream(str(root), num_workers=2, **kw)  # two workers, each its ring: copied into the batch
    for epoch in range(2):
        same(list(two.batches(epoch)), epoch)
    assert len(forks) == 4


def test_workers_exit_cleanly_in_a_process_where_prefect_runs(dataset):
    """A process that ran a Prefect flow holds Prefect's event service, which registers a callback for the
    shutdown of its threads (``threading._register_atexit``). A forked DataLoader worker inherited it and
    failed in it at exit, with code 1, which the rank reported as "DataLoader worker (pid N) exited
    unexpectedly" while shutting the worker down (seen in CI after tests/test_flows.py)."""
    from prefect.events.clients import NullEventsClient
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root, _ = dataset
    # the service a flow run starts; its client sends nowhere, and no API server is started (a closed port)
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:1/api"}):
        EventsWorker.instance(NullEventsClient)
        try:
            exits = []
            for batches in (TrainStream(str(root), img_size=8, global_batch_size=16, rank=0, world_size=1, seed=3,
                                        num_workers=1).batches(0),
                            EvalStream(str(root), img_size=8, batch_size=16, num_workers=1).batches()):
                next(batches)
                worker = _only_worker()
                batches.close()
                worker.join(10)
                exits.append(worker.exitcode)
            assert exits == [0, 0]
        finally:
            EventsWorker.drain_all()
