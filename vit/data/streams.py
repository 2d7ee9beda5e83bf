"""The training and evaluation streams: ``TrainStream`` (this rank's batches in the order of
``vit.data.order``) and ``EvalStream``.

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

import logging
import mmap
import multiprocessing
import weakref
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import torch
from einops import rearrange
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.format import DatasetError
from shards.workers import forget_parent_thread_exits
from vit.augment import INCEPTION_MEAN, INCEPTION_STD, ResizeCenterCrop, build_transform, normalize, stack_images
from vit.data import gpu
from vit.data.dataset import StreamError, _label_mode, _label_prior, _open_shard, load_dataset_info
from vit.data.order import _AUGMENT, LanePlan, slice_stream
from vit.data.reading import iter_lane, read_segment
from vit.data.samples import CorruptSample, LabelSpec, decode_sample, targets_tensor

log = logging.getLogger(__name__)


class Batch(NamedTuple):
    # TrainStream: uint8 [B, 3, H, W] stored channels-last (``to_device`` normalises it on the device);
    # EvalStream: float32 [B, 3, H, W], normalised
    images: torch.Tensor
    targets: torch.Tensor  # Long[B] (softmax) or Float[B, K] multi-hot (sigmoid)
    keys: list[str]
    step: int


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


_PREFETCH = 2  # chunks a DataLoader worker may have made or be making ahead of the rank (its prefetch_factor)


class _ChunkRing:
    """Shared buffers for one DataLoader worker's image chunks, mapped before the worker is forked and
    reused as long as it runs (epoch after epoch, see ``TrainStream.batches``). The DataLoader's own
    hand-over, a fresh shared tensor per chunk, cost the worker a copy into a new shm file and both
    processes a page fault per 4 KiB (90k faults an epoch of 1,984 images at 224 here, ~12 ms of CPU per
    64-image chunk); a reused buffer costs neither after its first use (that first use: ~40 ms of CPU for
    a 5-buffer ring at 224, paid once per worker). The worker takes a free buffer id, stacks the chunk
    into it and sends the id.

    The rank either copies the chunk out (several workers, pinned batches) and gives the id back at once,
    or, when the chunk is the whole batch, lends the buffer itself (``lend``): the id goes back only when
    the last tensor sharing its memory is gone, so a batch the consumer holds is never overwritten. It
    lends while ``_PREFETCH`` buffers stay unlent for the chunks in flight, so the worker never waits on
    a batch the consumer keeps (a consumer that keeps more gets copies); at most ``lendable`` are lent.
    """

    def __init__(self, n: int, size: int, *, lendable: int = 0):
        depth = _PREFETCH + 1 + lendable
        # an anonymous shared mapping: inherited by the forked worker, no file, unmapped with its last view
        # (populating it here, MADV_POPULATE_WRITE, cost 33-42 ms for 48 MB, as much as the worker's first use
        # (40 ms), and the worker still faults on every page (17 ms): a fork does not copy shared mappings' PTEs)
        self.buffers = np.frombuffer(mmap.mmap(-1, depth * n * size * size * 3), dtype=np.uint8)
        self.buffers = self.buffers.reshape(depth, n, size, size, 3)
        self.free = multiprocessing.get_context("fork").SimpleQueue()
        for i in range(depth):
            self.free.put(i)
        self.lendable, self.lent, self.returned = lendable, set(), []

    def fill(self, images: list[np.ndarray]) -> int:
        """In the worker: ``images`` (HWC uint8) into a free buffer; returns its id."""
        i = self.free.get()
        np.stack(images, out=self.buffers[i])
        return i

    def chunk(self, i: int) -> np.ndarray:
        """In the rank: buffer ``i``, ``uint8 [n, H, W, 3]``, valid until ``release(i)``."""
        return self.buffers[i]

    def release(self, i: int) -> None:
        self.free.put(i)

    def lend(self, i: int) -> torch.Tensor:
        """In the rank: buffer ``i`` as the batch, ``uint8 [n, 3, H, W]`` channels-last; a copy (and ``i``
        released) when ``lendable`` buffers are already out."""
        while self.returned:  # ids whose batches were dropped since the last step
            self.release(self.returned.pop())
        if len(self.lent) >= self.lendable:
            batch = torch.from_numpy(self.buffers[i].copy())
            self.release(i)
        else:
            view = self.buffers[i][...]  # its own ndarray: alive exactly as long as a tensor on its memory
            self.lent.add(i)
            weakref.finalize(view, self._returned, i).atexit = False
            batch = torch.from_numpy(view)
        return rearrange(batch, "b h w c -> b c h w")

    def _returned(self, i: int) -> None:
        # may run inside any allocation of any thread (cyclic GC): no lock taken here, the rank puts it back
        self.lent.discard(i)
        self.returned.append(i)


class _TrainLanes(IterableDataset):
    """The rank's lanes from ``epoch``, step ``start_step`` on; each worker takes every num_workers-th of them.

    A worker yields one chunk per step: ``dict(epoch, step, positions, keys, images uint8, labels, corrupt)``,
    through the end of the epoch and on into the following ones (``TrainStream.batches`` keeps a worker that
    read an epoch to its end for the next one). ``chunks`` yields one epoch's.
    """

    def __init__(self, *, plan: LanePlan, lanes: list[int], epoch: int, start_step: int, transform, spec: LabelSpec,
                 prepare=None, rings: list[_ChunkRing] | None = None):
        super().__init__()
        self.plan, self.lanes, self.epoch, self.start_step = plan, lanes, epoch, start_step
        self.transform, self.spec, self.prepare = transform, spec, prepare  # prepare: the GPU path (vit.data.gpu)
        self.rings = rings  # one per DataLoader worker: its images go through shared buffers reused all epoch

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(1)
        return self.epochs(self.lanes[worker::workers], worker=worker,
                           ring=self.rings[worker] if info is not None and self.rings else None)

    def epochs(self, lanes: list[int], *, worker: int, ring: _ChunkRing | None) -> Iterator[dict]:
        epoch, start_step = self.epoch, self.start_step
        while True:
            yield from self.chunks(lanes, epoch=epoch, start_step=start_step, worker=worker, ring=ring)
            epoch, start_step = epoch + 1, 0

    def chunks(self, lanes: list[int], *, epoch: int, start_step: int, worker: int = 0,
               ring: _ChunkRing | None = None) -> Iterator[dict]:
        plan, k = self.plan, self.plan.per_lane_step
        streams = {
            lane: iter_lane(
                plan.lane_segments(epoch, lane), plan.lane_order(epoch, lane),
                start_step * k, plan.lane_length, open_fn=_open_shard,
            )
            for lane in lanes
        }
        last_good: dict[int, _Slot | None] = {lane: None for lane in lanes}
        random = not isinstance(self.transform, ResizeCenterCrop)  # the centre crop takes no randomness
        for step in range(start_step, plan.steps_per_epoch):
            slots, corrupt = [], []
            for lane in lanes:
                lane_slots = []
                for _ in range(k):
                    j, sample = next(streams[lane])
                    slot = _Slot(position=plan.position(lane, j))
                    # a Generator costs ~20 us, about 5% of a small image's decode: made only when used
                    rng = np.random.default_rng([plan.seed, epoch, slot.position, _AUGMENT]) if random else None
                    try:
                        slot.image, slot.labels = decode_sample(sample, transform=self.transform, rng=rng,
                                                                spec=self.spec, prepare=self.prepare)
                        slot.key = sample["__key__"]
                    except CorruptSample as err:
                        corrupt.append((sample["__key__"], str(err)))
                    lane_slots.append(slot)
                last_good[lane] = _fill_corrupt(lane_slots, last_good[lane])
                slots.extend(lane_slots)
            if corrupt:
                good = next((s for s in slots if s.image is not None), None)
                if good is None:
                    raise DatasetError(
                        f"epoch {epoch} step {step}: none of the {len(slots)} samples of lanes {lanes} could be "
                        f"read ({corrupt[0][0]}: {corrupt[0][1]}); run `vitpipe verify` on the dataset"
                    )
                for slot in slots:
                    if slot.image is None:
                        slot.key, slot.image, slot.labels = good.key, good.image, good.labels
            slots.sort(key=lambda s: s.position)  # the batch's order
            images = [s.image for s in slots]
            if ring is not None:
                images = ring.fill(images)  # a buffer id
            elif self.prepare is None:
                images = stack_images(images)
            yield {
                "epoch": epoch,
                "step": step,
                "worker": worker,
                "positions": [s.position for s in slots],
                "keys": [s.key for s in slots],
                "images": images,
                "labels": [s.labels for s in slots],
                "corrupt": corrupt,
            }


class _Kept(NamedTuple):
    """Workers that read on past an epoch's end: their chunks start at ``epoch``, step 0."""

    epoch: int
    chunks: Iterator[dict]
    rings: list[_ChunkRing] | None


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
                 crop_pct: float = 0.875, pin_memory: bool | None = None, decode: str = "cpu", device=None):
        self.img_size, self.global_batch_size = img_size, global_batch_size
        self.rank, self.world_size, self.seed, self.num_workers = rank, world_size, seed, num_workers
        self.lanes, self.shuffle_buffer, self.augment, self.label_mode = lanes, shuffle_buffer, augment, label_mode
        self.mean, self.std, self.crop_pct = tuple(mean), tuple(std), crop_pct
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        # decode "gpu": JPEGs decoded and cropped on `device` (vit.data.gpu; default cuda, else cpu)
        self.decode = gpu.resolve_decode(decode)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.corrupt = []
        self._kept: _Kept | None = None  # workers kept for the next epoch (see ``batches``)
        self._check_numbers()
        self._load_dataset(dataset_url, label_mode)
        self.transform = build_transform(augment, img_size=img_size, crop_pct=crop_pct)
        if len(self.info.shards) < lanes:
            raise StreamError(
                f"{self.dataset_url} has {len(self.info.shards)} non-empty shards but lanes={lanes}: every lane "
                f"should read its own shards; re-shard with a smaller --shard-size (about "
                f"{max(1, self.info.num_samples // lanes)} or less) or set lanes <= {len(self.info.shards)} "
                f"(a multiple of world_size {world_size} that divides global_batch_size {global_batch_size})"
            )
        self.plan = LanePlan(shards=self.info.shards, seed=seed, lanes=lanes, global_batch_size=global_batch_size,
                             shuffle_buffer=shuffle_buffer)
        if self.plan.steps_per_epoch == 0:
            raise StreamError(
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
            raise StreamError(f"lanes ({c}), global_batch_size ({g}) and world_size ({w}) must be positive")
        if not 0 <= self.rank < w:
            raise StreamError(f"rank {self.rank} is outside world_size {w}")
        if g % c:
            raise StreamError(
                f"global_batch_size {g} is not a multiple of lanes {c}: set global_batch_size to a multiple of {c} "
                f"(e.g. {max(c, g // c * c)}) or lanes to a divisor of {g}"
            )
        if c % w:
            raise StreamError(
                f"lanes {c} is not a multiple of world_size {w}: every rank needs the same number of lanes; "
                f"use lanes = a multiple of {w} (lanes is saved in the checkpoint and must stay the same on resume, "
                "so pick one divisible by every world size you may resume on, e.g. 8 or 24)"
            )
        if self.num_workers < 0:
            raise StreamError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.num_workers > c // w:
            # workers only split the rank's lanes (the order does not depend on them): more would idle
            log.warning("num_workers %d > the rank's %d lanes (lanes %d / world_size %d): using %d workers; raise "
                        "lanes (a multiple of %d) for more", self.num_workers, c // w, c, w, c // w, w)
            self.num_workers = c // w
        if self.shuffle_buffer < 0:
            raise StreamError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")

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
                raise StreamError(
                    f"checkpoint data position has {key}={state[key]} but this run has {key}={getattr(self, key)}; "
                    f"resume with {key}={state[key]} (the sample order depends on it)"
                )

    # -- the batches

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """This rank's batches of ``epoch`` from global step ``start_step`` to ``steps_per_epoch - 1``.

        DataLoader workers that have handed out an epoch's last batch are kept, with their shared buffers,
        and read on into the next epoch (up to two chunks ahead, as within an epoch): ``batches(epoch + 1)``
        then continues with them instead of forking new ones. Any other epoch or step, or an epoch left
        before its end, stops them; so does ``close()``."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise StreamError(f"start_step {start_step} outside [0, {self.steps_per_epoch}] for epoch {epoch}")
        if start_step == self.steps_per_epoch:
            return  # nothing left of this epoch: no workers forked, kept ones stay
        kept, self._kept = self._kept, None
        if kept is not None and (kept.epoch, 0) == (epoch, start_step):
            chunks, rings = kept.chunks, kept.rings
        elif self.num_workers == 0:
            chunks, rings = self._dataset(epoch, start_step).chunks(self.rank_lanes, epoch=epoch,
                                                                     start_step=start_step), None
        else:
            kept = None  # its DataLoader iterator freed: the old workers stop before new ones are forked
            chunks, rings = self._start_workers(epoch, start_step)
        workers = max(self.num_workers, 1)
        for step in range(start_step, self.steps_per_epoch):
            parts = [next(chunks, None) for _ in range(workers)]
            if any(p is None for p in parts):
                raise RuntimeError(f"epoch {epoch}: data workers stopped at step {step} of {self.steps_per_epoch}")
            if any((p["epoch"], p["step"]) != (epoch, step) for p in parts):
                raise RuntimeError(f"data workers out of step: expected epoch {epoch} step {step}, got "
                                   f"{[(p['epoch'], p['step']) for p in parts]}")
            batch = self._assemble(parts, step, epoch, rings)
            if step == self.steps_per_epoch - 1 and self.num_workers:
                self._kept = _Kept(epoch + 1, chunks, rings)
            yield batch

    def close(self) -> None:
        """Stop the DataLoader workers kept for the next epoch (they also stop when the stream is freed)."""
        self._kept = None

    def _dataset(self, epoch: int, start_step: int) -> _TrainLanes:
        return _TrainLanes(plan=self.plan, lanes=self.rank_lanes, epoch=epoch, start_step=start_step,
                           transform=self.transform, spec=self.spec,
                           prepare=gpu.prepare if self.decode == "gpu" else None)

    def _start_workers(self, epoch: int, start_step: int) -> tuple[Iterator[dict], list[_ChunkRing] | None]:
        """Fork the workers (and map their rings first); returns their chunks from (epoch, start_step) on."""
        dataset = self._dataset(epoch, start_step)
        if self.decode == "cpu" and _mp_context() == "fork":  # (spawn: the DataLoader's own hand-over)
            k = self.plan.per_lane_step
            lend = 2 if self.num_workers == 1 and not self.pin_memory else 0  # its chunk is the batch
            dataset.rings = [_ChunkRing(len(self.rank_lanes[w::self.num_workers]) * k, self.img_size,
                                        lendable=lend) for w in range(self.num_workers)]
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=_PREFETCH,
                            multiprocessing_context=_mp_context(), persistent_workers=False,
                            worker_init_fn=forget_parent_thread_exits)
        return _start_workers(loader), dataset.rings

    def _assemble(self, parts: list[dict], step: int, epoch: int, rings: list[_ChunkRing] | None = None) -> Batch:
        """The workers' chunks (each sorted by position) -> the batch in position order, uint8. One worker
        (or none) and no pinning: the chunk is the batch (no copy; a worker's ring buffer is lent); else one
        copy, straight into the (pinned) batch, after which a worker's ring buffer goes back to it."""
        positions = np.concatenate([part["positions"] for part in parts])
        order = np.argsort(positions, kind="stable")
        keys = [k for part in parts for k in part["keys"]]
        labels = [ls for part in parts for ls in part["labels"]]
        keys, labels = [keys[i] for i in order], [labels[i] for i in order]
        corrupt = [c for part in parts for c in part["corrupt"]]
        if self.decode == "gpu":
            items = [item for part in parts for item in part["images"]]
            images, bad = gpu.finish_batch([items[i] for i in order], size=self.img_size, device=self.device)
            corrupt += _fill_undecodable(images, keys, labels, bad)
        elif len(parts) == 1 and not self.pin_memory:
            images = rings[0].lend(parts[0]["images"]) if rings else parts[0]["images"]
        else:
            chunks = [rings[p["worker"]].chunk(p["images"]) if rings
                      else rearrange(p["images"], "b c h w -> b h w c").numpy() for p in parts]
            n, h, w, c = len(positions), *chunks[0].shape[1:]
            images = _empty_batch(n, c, h, w, pin=self.pin_memory)
            # numpy's row copies: torch's index_put_ on uint8 took 6.4 ms per 64 images at 224, numpy 0.26 ms
            rows, slot, offset = rearrange(images, "b c h w -> b h w c").numpy(), np.argsort(order), 0
            for part, chunk in zip(parts, chunks):
                rows[slot[offset:offset + len(chunk)]] = chunk
                offset += len(chunk)
                if rings:
                    rings[part["worker"]].release(part["images"])
        for key, reason in corrupt:
            log.warning("epoch %d step %d: corrupt sample %s skipped (%s); slot filled with a neighbour",
                        epoch, step, key, reason)
        self.corrupt.extend(corrupt)
        return Batch(images=images, targets=_maybe_pinned(targets_tensor(labels, self.spec), self.pin_memory),
                     keys=keys, step=step)


def _fill_undecodable(images: torch.Tensor, keys: list, labels: list, bad: list[int]) -> list[tuple[str, str]]:
    """GPU path: rows no decoder could read take the previous good row of the batch (or the next one);
    returns the (key, reason) of each. A batch without a single decodable image is an error."""
    if not bad:
        return []
    undecodable = set(bad)
    good = [i for i in range(len(keys)) if i not in undecodable]
    if not good:
        raise DatasetError(f"none of the {len(keys)} images of a batch could be decoded ({keys[0]}); "
                           "run `vitpipe verify` on the dataset")
    out = []
    for i in bad:
        source = max((g for g in good if g < i), default=good[0])
        out.append((keys[i], "undecodable JPEG (device and CPU decoders refused it)"))
        images[i], keys[i], labels[i] = images[source], keys[source], labels[source]
    return out


def to_device(images: torch.Tensor, *, device, dtype: torch.dtype = torch.float32, mean=INCEPTION_MEAN,
              std=INCEPTION_STD) -> torch.Tensor:
    """A TrainStream batch's uint8 images -> normalised ``dtype`` on ``device`` (the training step calls it).

    The copy to the device moves bytes (a quarter of float32's); the device does the arithmetic, the
    same ``vit.augment.normalize`` as the CPU did before, so the result is the same to the bit on CPU.
    Float images (EvalStream) are only moved and cast.
    """
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = normalize(images, mean=mean, std=std)
    return images.to(dtype)


def _empty_batch(n: int, c: int, h: int, w: int, *, pin: bool) -> torch.Tensor:
    """``uint8 [n, c, h, w]`` in channels-last memory; page-locked when ``pin`` (CUDA only: unverified on GPU)."""
    return rearrange(torch.empty((n, h, w, c), dtype=torch.uint8, pin_memory=pin), "b h w c -> b c h w")


def _maybe_pinned(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    """Page-locked so ``.to("cuda", non_blocking=True)`` overlaps the copy.  # unverified on GPU"""
    return tensor.pin_memory() if pin else tensor


def _start_workers(loader: DataLoader) -> Iterator:
    """``iter(loader)``, which forks the workers, with the objects alive now kept out of their GC
    (see ``shards.workers.gc_frozen``): measured ~0.3 s per worker and epoch here otherwise (the S3
    benchmark's first batch with 2 workers came after 0.51 s, with this 0.25 s)."""
    from shards.workers import gc_frozen

    with gc_frozen():
        return iter(loader)


def _mp_context():
    # fork keeps the process's storage settings (endpoint) and is cheap; spawn where fork is unavailable
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


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
                    yield {"images": stack_images(images), "labels": labels, "keys": keys, "corrupt": corrupt}
                    images, labels, keys, corrupt = [], [], [], []
        if images or corrupt:
            yield {"images": stack_images(images) if images else None, "labels": labels, "keys": keys,
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
            raise StreamError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise StreamError(f"rank {rank} is outside world_size {world_size}")
        if num_workers < 0:
            raise StreamError(f"num_workers must be >= 0, got {num_workers}")
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
                                              multiprocessing_context=_mp_context(),
                                              worker_init_fn=forget_parent_thread_exits))
        step = 0
        for part in parts:
            for key, reason in part["corrupt"]:
                log.warning("eval: corrupt sample %s skipped (%s)", key, reason)
            self.corrupt.extend(part["corrupt"])
            if part["images"] is None:
                continue
            yield Batch(images=_maybe_pinned(normalize(part["images"], mean=self.mean, std=self.std), self.pin_memory),
                        targets=_maybe_pinned(targets_tensor(part["labels"], self.spec), self.pin_memory),
                        keys=list(part["keys"]), step=step)
            step += 1
