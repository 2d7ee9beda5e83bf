"""The training input pipeline: deterministic, elastic streaming over WebDataset tar shards.

Plain WebDataset splits shards by node and worker, so the order of samples depends on how
many ranks and workers read them, and a resumed run cannot continue an epoch on a different
number of ranks. Here the order is a function of (seed, epoch, position) alone:

* **Epoch stream.** Each epoch the shard list is permuted with ``rng(seed, epoch)`` and
  concatenated into one virtual stream of N samples (sample counts come from the manifest).
* **Lanes.** The stream is cut into ``lanes`` (C, default 8) contiguous ranges of equal
  length ``L = steps_per_epoch * G / C``; a lane may begin or end inside a shard (the lane
  skips the head of its first shard's tar members without decoding them). Every lane has
  exactly the same length in every epoch, so ``steps_per_epoch = (N // C) * C // G`` is a
  constant and every rank takes the same number of steps, however uneven the shards are.
  The last ``N - steps_per_epoch * G`` samples of the permuted stream are left out of that
  epoch (``dropped_per_epoch``; different samples each epoch). Cutting the stream, rather
  than dealing whole shards to lanes, is what keeps ``steps_per_epoch`` the same in every
  epoch (the trainer's schedule and checkpoint arithmetic rely on it); a lane that starts
  inside a shard reads past that shard's head once per epoch. Fewer shards than lanes is
  refused (lanes would re-read the same tars): re-shard smaller or lower ``lanes``.
* **Shuffle window.** Inside a lane, output position j takes raw sample ``order[j]`` where
  ``order = argsort(i + U(0, shuffle_buffer))`` with ``rng(seed, epoch, lane)``: a sliding-window
  shuffle like WebDataset's buffer (a sample moves < ``shuffle_buffer`` places), but computed
  on indices, so it does not depend on what was read. Raw samples are kept as tar bytes until
  their turn; images are decoded only when emitted. The first steps of an epoch therefore read
  up to ``shuffle_buffer`` samples ahead per lane; tars are parsed with ``shards.format.TarMembers``, a lean
  header reader: a member costs ~7 us here against ~40 us through ``tarfile`` (measured on
  the digits shards, three members per sample: a quarter of the time per small image).
* **Global position.** Position p of the epoch is lane ``p % C``, index ``p // C`` in that lane;
  global step s is positions ``[s*G, (s+1)*G)``. Rank r owns the lanes ``c % world_size == r``,
  and its DataLoader workers split those lanes among them (so ``lanes`` must be a multiple
  of ``world_size``; ``num_workers`` is capped at ``lanes // world_size``). Each worker yields
  one chunk per step; the rank assembles its local batch from its workers' chunks and orders
  it by p, so the batch does not depend on the number of workers either.
* **Resume.** ``batches(epoch, start_step=s)`` starts every lane at index ``s * G / C``. Shards
  whose samples were all emitted before that are not opened; inside a shard, already-emitted
  samples are skipped as tar members (read past, never decoded). The data position in a
  checkpoint is ``{"epoch", "step"}`` plus ``seed``, ``lanes`` and ``shuffle_buffer``, which
  must not change (``TrainStream.state`` / ``check_resume``); world size and workers may.
* **Augmentation** randomness is seeded by (seed, epoch, p) for the same reason.
* **Sizing lanes.** A lane is read by one DataLoader worker, so a rank decodes with at most
  ``lanes // world_size`` processes. ``lanes=8`` suits the CPU runs here; on GPUs pick a
  multiple of (largest world size you will resume on) x (workers per rank), e.g. 256 for up
  to 32 GPUs x 8 workers, and shard so that there are at least that many shards. Memory per
  worker is about ``lanes_per_worker * shuffle_buffer / 2`` encoded samples.

Corrupt samples (undecodable image, missing/invalid label, a tar that breaks mid-stream)
are never fatal: the sample's slot is filled with the previous good sample of the same lane
(or, at the start of a lane, the next good one in the same step chunk), the key and reason
are counted on the stream (``TrainStream.corrupt``) and logged. Filling the slot keeps every
lane, and so every rank, at exactly the same number of samples per step. A whole step
chunk without a single readable sample is an error.

``EvalStream`` reads the manifest-order stream without shuffling: rank r reads the contiguous
range ``[r*N//W, (r+1)*N//W)``, every sample exactly once over all ranks, no padding. Ranks
may therefore yield different numbers of batches (the last one may be short); the evaluator
all-reduces sums, not per-batch values.
"""
from __future__ import annotations

import contextlib
import logging
import tarfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.format import TarMembers, image_ext, split_name
from vit.augment import INCEPTION_MEAN, INCEPTION_STD, ResizeCenterCrop, build_transform, normalize, open_image, stack_chw

log = logging.getLogger(__name__)

# Tags that keep the random streams of the different uses of one (seed, epoch) apart.
_SHARD_ORDER, _WINDOW, _AUGMENT = 0x5A1D, 0x3E77, 0xA06E


class Batch(NamedTuple):
    images: torch.Tensor  # float32 [B, 3, H, W], normalised
    targets: torch.Tensor  # Long[B] (softmax) or Float[B, K] multi-hot (sigmoid)
    keys: list[str]
    step: int


class CorruptSample(ValueError):
    """A sample that cannot be used (bad image bytes, missing or invalid label)."""


# ----------------------------------------------------------------------------- the dataset


@dataclass(frozen=True)
class ShardInfo:
    url: str
    samples: int


@dataclass(frozen=True)
class DatasetInfo:
    """What the pipeline needs from ``manifest.json``."""

    url: str
    shards: tuple[ShardInfo, ...]
    classes: tuple[str, ...]
    label_histogram: tuple[int, ...]
    multi_label: bool

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_dataset_info(dataset_url: str) -> DatasetInfo:
    """Read the manifest of ``dataset_url`` (local folder or ``s3://`` prefix); its fields are checked
    by ``shards.format.validate_manifest`` (a DatasetError names the file and field)."""
    from shards.reader import load_manifest, shard_urls

    manifest = load_manifest(dataset_url)
    shards = tuple(ShardInfo(url=url, samples=entry["samples"])
                   for url, entry in zip(shard_urls(dataset_url, manifest), manifest["shards"]) if entry["samples"])
    classes = tuple(str(c) for c in manifest["classes"])
    return DatasetInfo(
        url=str(dataset_url),
        shards=shards,
        classes=classes,
        label_histogram=tuple(int(c) for c in manifest.get("label_histogram") or [0] * len(classes)),
        multi_label=manifest.get("multi_label", False),
    )


def _open_shard(url: str) -> BinaryIO:
    from shards.reader import open_shard

    return open_shard(url)


# ----------------------------------------------------------------------------- reading tars


@dataclass(frozen=True)
class Segment:
    """``count`` consecutive samples of one shard, starting at sample ``first``."""

    url: str
    first: int
    count: int


def slice_stream(shards: Sequence[ShardInfo], start: int, stop: int) -> list[Segment]:
    """The samples ``[start, stop)`` of the concatenation of ``shards`` as per-shard segments."""
    out, offset = [], 0
    for shard in shards:
        lo, hi = max(start, offset), min(stop, offset + shard.samples)
        if lo < hi:
            out.append(Segment(shard.url, lo - offset, hi - lo))
        offset += shard.samples
        if offset >= stop:
            break
    return out


_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, ValueError)
_REOPENS = 3  # a shard stream that fails mid-way (network) is re-opened this often before the error is fatal


def read_segment(
    segment: Segment, *, keep: Callable[[int], bool], open_fn: Callable[[str], BinaryIO]
) -> Iterator[tuple[int, dict]]:
    """``(i, sample)`` for each kept sample i of the segment (0-based, ascending).

    A sample is ``{"__key__": key, ext: bytes, ...}``; samples not kept are read past as tar
    members without extracting them. A storage error mid-stream (``StorageError``, e.g. a
    dropped connection) re-opens the shard and continues at the same sample, up to
    ``_REOPENS`` times; then it is fatal, as is a shard that cannot be opened. When the tar
    itself ends early or is broken, every kept index is still yielded exactly once, as
    ``{"__key__": "<shard>#<index>", "__error__": reason}`` (``decode_sample`` rejects it).
    """
    from shards.storage import StorageError, StorageNotFound

    progress = [0]  # segment indices below this were yielded or not wanted
    reason = "the tar ends before this sample (the manifest counts more samples than the shard holds)"
    for attempt in range(_REOPENS + 1):
        try:
            yield from _scan_tar(segment, progress, keep=keep, open_fn=open_fn)
            break
        except StorageNotFound:
            raise
        except StorageError as err:
            if attempt == _REOPENS:
                raise
            log.warning("%s: stream failed at sample %d (%s); re-opening", segment.url,
                        segment.first + progress[0], err)
        except _TAR_ERRORS as err:
            reason = f"the tar is broken before this sample ({type(err).__name__}: {err})"
            log.warning("%s: tar broken at sample %d (%s); the rest of the shard counts as corrupt", segment.url,
                        segment.first + progress[0], err)
            break
    name = segment.url.rstrip("/").rsplit("/", 1)[-1]
    for i in range(progress[0], segment.count):
        if keep(i):
            yield i, {"__key__": f"{name}#{segment.first + i}", "__error__": reason}


def _scan_tar(segment: Segment, progress: list[int], *, keep, open_fn) -> Iterator[tuple[int, dict]]:
    """One pass over the shard from its start, yielding kept samples at segment index >= progress[0]."""
    first, skip_to = segment.first, segment.first + progress[0]
    with contextlib.closing(open_fn(segment.url)) as stream:
        members = TarMembers(stream)
        index, key, sample = -1, None, None
        for name, _ in members:
            member_key, ext = split_name(name)
            if member_key != key:  # the sample at `index` is complete
                if sample is not None:
                    yield index - first, sample
                progress[0] = max(progress[0], index - first + 1)
                index, key, sample = index + 1, member_key, None
                if index - first >= segment.count:
                    return
                if index >= skip_to and keep(index - first):
                    sample = {"__key__": member_key}
            if sample is not None:
                sample[ext] = members.read()
        if sample is not None:
            yield index - first, sample
        progress[0] = max(progress[0], index - first + 1)


def window_order(n: int, window: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of ``range(n)`` in which an item moves fewer than ``window`` places."""
    if window <= 1 or n <= 1:
        return np.arange(n)
    return np.argsort(np.arange(n) + rng.random(n) * window, kind="stable")


def iter_lane(
    segments: Sequence[Segment], order: np.ndarray, start: int, stop: int, *, open_fn: Callable[[str], BinaryIO]
) -> Iterator[tuple[int, dict]]:
    """``(j, sample)`` for lane output positions ``start <= j < stop``; sample = raw index ``order[j]``.

    Raw samples emitted before ``start`` are never kept; shards that hold only such samples
    are never opened. Memory: the samples read but not yet emitted (about the window size).
    """
    if start >= stop:
        return
    wanted = np.zeros(len(order), dtype=bool)
    wanted[order[start:stop]] = True
    raw = _iter_raw(segments, wanted, open_fn=open_fn)
    held: dict[int, dict] = {}
    for j in range(start, stop):
        r = int(order[j])
        while r not in held:
            idx, sample = next(raw)
            held[idx] = sample
        yield j, held.pop(r)


def _iter_raw(segments, wanted: np.ndarray, *, open_fn) -> Iterator[tuple[int, dict]]:
    offset = 0
    for segment in segments:
        base = offset
        offset += segment.count
        if not wanted[base : base + segment.count].any():
            continue
        for i, sample in read_segment(segment, keep=lambda i, base=base: bool(wanted[base + i]), open_fn=open_fn):
            yield base + i, sample


# ----------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class LabelSpec:
    num_classes: int
    multi_label: bool  # the targets' form: multi-hot (sigmoid) or class index (softmax)


def parse_labels(sample: dict, spec: LabelSpec) -> list[int]:
    """The sample's label ids from ``.cls`` (ascii int) or ``.json`` ``labels``; checked against the class count."""
    if "json" in sample:
        import json

        try:
            meta = json.loads(sample["json"])
        except ValueError as err:
            raise CorruptSample(f"invalid .json ({err})") from None
        labels = meta.get("labels") if isinstance(meta, dict) else None
        if labels is None and "cls" not in sample:
            raise CorruptSample(".json has no 'labels'")
    else:
        labels = None
    if labels is None:
        if "cls" not in sample:
            raise CorruptSample("no .cls or .json label")
        try:
            labels = [int(sample["cls"].strip())]
        except ValueError:
            raise CorruptSample(f"invalid .cls {sample['cls'][:20]!r}") from None
    if not isinstance(labels, list) or not all(isinstance(x, int) and 0 <= x < spec.num_classes for x in labels):
        raise CorruptSample(f"labels {str(labels)[:60]} not ids in [0, {spec.num_classes})")
    if not spec.multi_label and len(labels) != 1:
        raise CorruptSample(f"{len(labels)} labels on a single-label (softmax) dataset")
    return labels


def decode_sample(sample: dict, *, transform, rng, spec: LabelSpec) -> tuple[np.ndarray, list[int]]:
    """Raw tar sample -> (uint8 image [S,S,3], label ids). Raises CorruptSample."""
    if "__error__" in sample:
        raise CorruptSample(sample["__error__"])
    ext = image_ext(sample)
    if ext is None:
        raise CorruptSample(f"no image member (has {sorted(k for k in sample if k != '__key__')})")
    labels = parse_labels(sample, spec)
    try:
        image = transform(open_image(sample[ext]), rng)
    except Exception as err:  # PIL raises many kinds on broken bytes
        raise CorruptSample(f"undecodable .{ext} ({type(err).__name__}: {err})") from None
    return image, labels


def targets_tensor(labels: Sequence[list[int]], spec: LabelSpec) -> torch.Tensor:
    if not spec.multi_label:
        return torch.tensor([ls[0] for ls in labels], dtype=torch.long)
    out = torch.zeros(len(labels), spec.num_classes, dtype=torch.float32)
    for row, ls in enumerate(labels):
        out[row, ls] = 1.0
    return out


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class LanePlan:
    """Where every sample of an epoch goes: pure arithmetic on (dataset, seed, epoch, lanes, G)."""

    shards: tuple[ShardInfo, ...]
    seed: int
    lanes: int
    global_batch_size: int
    shuffle_buffer: int

    @property
    def per_lane_step(self) -> int:  # samples a lane gives to one global step
        return self.global_batch_size // self.lanes

    @property
    def steps_per_epoch(self) -> int:
        total = sum(s.samples for s in self.shards)
        return (total // self.lanes) // self.per_lane_step

    @property
    def lane_length(self) -> int:
        return self.steps_per_epoch * self.per_lane_step

    def epoch_shards(self, epoch: int) -> list[ShardInfo]:
        rng = np.random.default_rng([self.seed, epoch, _SHARD_ORDER])
        return [self.shards[i] for i in rng.permutation(len(self.shards))]

    def lane_segments(self, epoch: int, lane: int) -> list[Segment]:
        n = self.lane_length
        return slice_stream(self.epoch_shards(epoch), lane * n, (lane + 1) * n)

    def lane_order(self, epoch: int, lane: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, lane, _WINDOW])
        return window_order(self.lane_length, self.shuffle_buffer, rng)

    def position(self, lane: int, index: int) -> int:
        return index * self.lanes + lane


@dataclass
class _Slot:
    """One lane position of a step chunk while it is being filled."""

    position: int
    key: str | None = None
    image: np.ndarray | None = None
    labels: list[int] | None = None


def _fill_corrupt(slots: list[_Slot], last_good: _Slot | None) -> _Slot | None:
    """Fill corrupt slots of one lane's chunk in place; return the lane's last good slot."""
    first_good = next((s for s in slots if s.image is not None), None)
    for slot in slots:
        if slot.image is not None:
            last_good = slot
            continue
        source = last_good or first_good
        if source is not None:
            slot.key, slot.image, slot.labels = source.key, source.image, source.labels
    return last_good


class _TrainLanes(IterableDataset):
    """The rank's lanes for one epoch; each worker takes every num_workers-th of them.

    Yields one chunk per step: ``dict(step, positions, keys, images uint8, labels, corrupt)``.
    """

    def __init__(self, *, plan: LanePlan, lanes: list[int], epoch: int, start_step: int, transform, spec: LabelSpec):
        super().__init__()
        self.plan, self.lanes, self.epoch, self.start_step = plan, lanes, epoch, start_step
        self.transform, self.spec = transform, spec

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        return self.chunks(self.lanes[worker::workers])

    def chunks(self, lanes: list[int]) -> Iterator[dict]:
        plan, k = self.plan, self.plan.per_lane_step
        streams = {
            lane: iter_lane(
                plan.lane_segments(self.epoch, lane), plan.lane_order(self.epoch, lane),
                self.start_step * k, plan.lane_length, open_fn=_open_shard,
            )
            for lane in lanes
        }
        last_good: dict[int, _Slot | None] = {lane: None for lane in lanes}
        random = not isinstance(self.transform, ResizeCenterCrop)  # the centre crop takes no randomness
        for step in range(self.start_step, plan.steps_per_epoch):
            slots, corrupt = [], []
            for lane in lanes:
                lane_slots = []
                for _ in range(k):
                    j, sample = next(streams[lane])
                    slot = _Slot(position=plan.position(lane, j))
                    # a Generator costs ~20 us, about 5% of a small image's decode: made only when used
                    rng = np.random.default_rng([plan.seed, self.epoch, slot.position, _AUGMENT]) if random else None
                    try:
                        slot.image, slot.labels = decode_sample(sample, transform=self.transform, rng=rng,
                                                                spec=self.spec)
                        slot.key = sample["__key__"]
                    except CorruptSample as err:
                        corrupt.append((sample["__key__"], str(err)))
                    lane_slots.append(slot)
                last_good[lane] = _fill_corrupt(lane_slots, last_good[lane])
                slots.extend(lane_slots)
            if corrupt:
                good = next((s for s in slots if s.image is not None), None)
                if good is None:
                    raise RuntimeError(
                        f"epoch {self.epoch} step {step}: none of the {len(slots)} samples of lanes {lanes} could be "
                        f"read ({corrupt[0][0]}: {corrupt[0][1]}); run `vitpipe verify` on the dataset"
                    )
                for slot in slots:
                    if slot.image is None:
                        slot.key, slot.image, slot.labels = good.key, good.image, good.labels
            yield {
                "step": step,
                "positions": [s.position for s in slots],
                "keys": [s.key for s in slots],
                "images": stack_chw([s.image for s in slots]),
                "labels": [s.labels for s in slots],
                "corrupt": corrupt,
            }


# ----------------------------------------------------------------------------- public API


def _label_mode(label_mode: str, info: DatasetInfo) -> bool:
    """True for sigmoid (multi-hot targets)."""
    if label_mode == "auto":
        return info.multi_label
    if label_mode == "sigmoid":
        return True
    if label_mode == "softmax":
        if info.multi_label:
            raise ValueError(
                f"label_mode='softmax' but {info.url}/manifest.json says multi_label: true; "
                "use label_mode='sigmoid' (or 'auto') for multi-label data"
            )
        return False
    raise ValueError(f"label_mode={label_mode!r} is not known; use 'auto', 'softmax' or 'sigmoid'")


def _label_prior(info: DatasetInfo, multi_label: bool) -> torch.Tensor:
    counts = torch.tensor(info.label_histogram, dtype=torch.float64)
    denom = info.num_samples if multi_label else counts.sum().item()
    return (counts / max(denom, 1)).to(torch.float32)


class _DatasetStream:
    """What both streams read from the manifest: the dataset's info and the label encoding."""

    def _load_dataset(self, dataset_url: str, label_mode: str) -> None:
        self.dataset_url = str(dataset_url)
        self.info = load_dataset_info(self.dataset_url)
        self.spec = LabelSpec(num_classes=self.info.num_classes, multi_label=_label_mode(label_mode, self.info))

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def multi_label(self) -> bool:
        """True when targets are multi-hot (sigmoid cross-entropy)."""
        return self.spec.multi_label


class TrainStream(_DatasetStream):
    """This rank's share of the training batches; see the module docstring for the guarantees.

    ``global_batch_size`` must be a multiple of ``lanes``; ``lanes`` a multiple of
    ``world_size``; every rank gets ``global_batch_size // world_size`` samples per step.
    ``label_prior`` is the per-class frequency from the manifest histogram (fraction of
    images carrying the class for multi-label data; class share for single-label data).
    """

    def __init__(self, dataset_url: str, *, img_size: int, global_batch_size: int, rank: int, world_size: int,
                 seed: int = 0, num_workers: int = 2, lanes: int = 8, shuffle_buffer: int = 1000,
                 augment: str = "pretrain", label_mode: str = "auto", mean=INCEPTION_MEAN, std=INCEPTION_STD,
                 crop_pct: float = 0.875, pin_memory: bool | None = None):
        self.img_size, self.global_batch_size = img_size, global_batch_size
        self.rank, self.world_size, self.seed, self.num_workers = rank, world_size, seed, num_workers
        self.lanes, self.shuffle_buffer, self.augment, self.label_mode = lanes, shuffle_buffer, augment, label_mode
        self.mean, self.std, self.crop_pct = tuple(mean), tuple(std), crop_pct
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.corrupt = []
        self._check_numbers()
        self._load_dataset(dataset_url, label_mode)
        self.transform = build_transform(augment, img_size=img_size, crop_pct=crop_pct)
        if len(self.info.shards) < lanes:
            raise ValueError(
                f"{self.dataset_url} has {len(self.info.shards)} non-empty shards but lanes={lanes}: every lane "
                f"should read its own shards; re-shard with a smaller --shard-size (about "
                f"{max(1, self.info.num_samples // lanes)} or less) or set lanes <= {len(self.info.shards)} "
                f"(a multiple of world_size {world_size} that divides global_batch_size {global_batch_size})"
            )
        self.plan = LanePlan(shards=self.info.shards, seed=seed, lanes=lanes, global_batch_size=global_batch_size,
                             shuffle_buffer=shuffle_buffer)
        if self.plan.steps_per_epoch == 0:
            raise ValueError(
                f"{self.dataset_url} has {self.info.num_samples} samples: not enough for one global batch of "
                f"{global_batch_size} over {lanes} lanes; lower global_batch_size"
            )
        self.rank_lanes = list(range(rank, lanes, world_size))
        if rank == 0:
            log.info("%s: %d samples in %d shards -> %d lanes x %d samples, %d steps/epoch of %d, %d samples left out "
                     "per epoch", self.dataset_url, self.info.num_samples, len(self.info.shards), lanes,
                     self.plan.lane_length, self.steps_per_epoch, global_batch_size, self.dropped_per_epoch)

    def _check_numbers(self) -> None:
        g, c, w = self.global_batch_size, self.lanes, self.world_size
        if c <= 0 or g <= 0 or w <= 0:
            raise ValueError(f"lanes ({c}), global_batch_size ({g}) and world_size ({w}) must be positive")
        if not 0 <= self.rank < w:
            raise ValueError(f"rank {self.rank} is outside world_size {w}")
        if g % c:
            raise ValueError(
                f"global_batch_size {g} is not a multiple of lanes {c}: set global_batch_size to a multiple of {c} "
                f"(e.g. {max(c, g // c * c)}) or lanes to a divisor of {g}"
            )
        if c % w:
            raise ValueError(
                f"lanes {c} is not a multiple of world_size {w}: every rank needs the same number of lanes; "
                f"use lanes = a multiple of {w} (lanes is saved in the checkpoint and must stay the same on resume, "
                "so pick one divisible by every world size you may resume on, e.g. 8 or 24)"
            )
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.num_workers > c // w:
            # workers only split the rank's lanes (the order does not depend on them): more would idle
            log.warning("num_workers %d > the rank's %d lanes (lanes %d / world_size %d): using %d workers; raise "
                        "lanes (a multiple of %d) for more", self.num_workers, c // w, c, w, c // w, w)
            self.num_workers = c // w
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")

    # -- what the trainer reads

    @property
    def label_prior(self) -> torch.Tensor:
        return _label_prior(self.info, self.spec.multi_label)

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    @property
    def dropped_per_epoch(self) -> int:
        """Samples of the (permuted) stream left out of each epoch so that every lane has the same length."""
        return self.info.num_samples - self.steps_per_epoch * self.global_batch_size

    def state(self, *, epoch: int, step: int) -> dict:
        """The data position to put in a checkpoint (seed, lanes and shuffle_buffer fix the order)."""
        return {"epoch": epoch, "step": step, "seed": self.seed, "lanes": self.lanes,
                "shuffle_buffer": self.shuffle_buffer}

    def check_resume(self, state: dict) -> None:
        """Raise unless ``state`` (from ``state()``) can be resumed with this stream's settings."""
        for key in ("seed", "lanes", "shuffle_buffer"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"checkpoint data position has {key}={state[key]} but this run has {key}={getattr(self, key)}; "
                    f"resume with {key}={state[key]} (the sample order depends on it)"
                )

    # -- the batches

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """This rank's batches of ``epoch`` from global step ``start_step`` to ``steps_per_epoch - 1``."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside [0, {self.steps_per_epoch}] for epoch {epoch}")
        dataset = _TrainLanes(plan=self.plan, lanes=self.rank_lanes, epoch=epoch, start_step=start_step,
                              transform=self.transform, spec=self.spec)
        workers = max(self.num_workers, 1)
        if self.num_workers == 0:
            chunks = dataset.chunks(self.rank_lanes)
        else:
            chunks = _start_workers(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                               multiprocessing_context=_mp_context(), persistent_workers=False))
        for step in range(start_step, self.steps_per_epoch):
            parts = [next(chunks, None) for _ in range(workers)]
            if any(p is None for p in parts):
                raise RuntimeError(f"epoch {epoch}: data workers stopped at step {step} of {self.steps_per_epoch}")
            if any(p["step"] != step for p in parts):
                raise RuntimeError(f"data workers out of step: expected {step}, got {[p['step'] for p in parts]}")
            yield self._assemble(parts, step, epoch)

    def _assemble(self, parts: list[dict], step: int, epoch: int) -> Batch:
        positions = [p for part in parts for p in part["positions"]]
        keys = [k for part in parts for k in part["keys"]]
        labels = [ls for part in parts for ls in part["labels"]]
        images = np.concatenate([part["images"].numpy() for part in parts])
        order = sorted(range(len(positions)), key=positions.__getitem__)
        for part in parts:
            for key, reason in part["corrupt"]:
                log.warning("epoch %d step %d: corrupt sample %s skipped (%s); slot filled with a neighbour",
                            epoch, step, key, reason)
            self.corrupt.extend(part["corrupt"])
        return _maybe_pinned(Batch(
            images=normalize(torch.from_numpy(images[order]), mean=self.mean, std=self.std),
            targets=targets_tensor([labels[i] for i in order], self.spec),
            keys=[keys[i] for i in order],
            step=step,
        ), self.pin_memory)


def _maybe_pinned(batch: Batch, pin: bool) -> Batch:
    """Page-locked tensors so ``.to("cuda", non_blocking=True)`` overlaps the copy.  # unverified on GPU"""
    if not pin:
        return batch
    return batch._replace(images=batch.images.pin_memory(), targets=batch.targets.pin_memory())


def _start_workers(loader: DataLoader) -> Iterator:
    """``iter(loader)``, which forks the workers, with the objects alive now kept out of their GC
    (see ``shards.workers.gc_frozen``): measured ~0.3 s per worker and epoch here otherwise (the S3
    benchmark's first batch with 2 workers came after 0.51 s, with this 0.25 s)."""
    from shards.workers import gc_frozen

    with gc_frozen():
        return iter(loader)


def _mp_context():
    import multiprocessing

    # fork keeps the process's storage settings (endpoint) and is cheap; spawn where fork is unavailable
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


# ----------------------------------------------------------------------------- evaluation


class _EvalRange(IterableDataset):
    def __init__(self, *, shards, start: int, stop: int, batch_size: int, transform, spec: LabelSpec):
        super().__init__()
        self.shards, self.start, self.stop = shards, start, stop
        self.batch_size, self.transform, self.spec = batch_size, transform, spec

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        n = self.stop - self.start
        lo, hi = self.start + worker * n // workers, self.start + (worker + 1) * n // workers
        return self.batches(lo, hi)

    def batches(self, lo: int, hi: int) -> Iterator[dict]:
        images, labels, keys, corrupt = [], [], [], []
        for segment in slice_stream(self.shards, lo, hi):
            for _, sample in read_segment(segment, keep=lambda i: True, open_fn=_open_shard):
                try:
                    image, ls = decode_sample(sample, transform=self.transform, rng=None, spec=self.spec)
                except CorruptSample as err:
                    corrupt.append((sample["__key__"], str(err)))
                    continue
                images.append(image)
                labels.append(ls)
                keys.append(sample["__key__"])
                if len(images) == self.batch_size:
                    yield {"images": stack_chw(images), "labels": labels, "keys": keys, "corrupt": corrupt}
                    images, labels, keys, corrupt = [], [], [], []
        if images or corrupt:
            yield {"images": stack_chw(images) if images else None, "labels": labels, "keys": keys,
                   "corrupt": corrupt}


class EvalStream(_DatasetStream):
    """Resize + centre crop, every sample of the dataset exactly once over all ranks, in manifest order.

    Rank r reads samples ``[r*N//W, (r+1)*N//W)`` of the manifest-order stream (its workers
    split that range again); nothing is padded, so ranks may yield different numbers of
    batches and the last batch of a worker may be short: all-reduce sums, not batch counts.
    Corrupt samples are skipped, counted in ``corrupt`` and logged (the evaluator's count
    check then reports the shortfall).
    """

    def __init__(self, dataset_url: str, *, img_size: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, crop_pct: float = 0.875, label_mode: str = "auto",
                 mean=INCEPTION_MEAN, std=INCEPTION_STD, pin_memory: bool | None = None):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.img_size, self.batch_size = img_size, batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.mean, self.std = tuple(mean), tuple(std)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._load_dataset(dataset_url, label_mode)
        self.transform = ResizeCenterCrop(img_size=img_size, crop_pct=crop_pct)
        n = self.info.num_samples
        self.start, self.stop = rank * n // world_size, (rank + 1) * n // world_size
        self.corrupt: list[tuple[str, str]] = []

    @property
    def num_samples(self) -> int:
        """Samples this rank reads."""
        return self.stop - self.start

    def __iter__(self) -> Iterator[Batch]:
        return self.batches()

    def batches(self) -> Iterator[Batch]:
        dataset = _EvalRange(shards=self.info.shards, start=self.start, stop=self.stop, batch_size=self.batch_size,
                             transform=self.transform, spec=self.spec)
        if self.num_workers == 0:
            parts = dataset.batches(self.start, self.stop)
        else:
            parts = _start_workers(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                              multiprocessing_context=_mp_context()))
        step = 0
        for part in parts:
            for key, reason in part["corrupt"]:
                log.warning("eval: corrupt sample %s skipped (%s)", key, reason)
            self.corrupt.extend(part["corrupt"])
            if part["images"] is None:
                continue
            yield _maybe_pinned(Batch(images=normalize(part["images"], mean=self.mean, std=self.std),
                                      targets=targets_tensor(part["labels"], self.spec), keys=list(part["keys"]),
                                      step=step), self.pin_memory)
            step += 1
