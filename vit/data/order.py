"""The order spec: which samples make up each global step, as arithmetic on (seed, epoch, step).

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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from vit.data.dataset import ShardInfo

# Tags that keep the random streams of the different uses of one (seed, epoch) apart.
_SHARD_ORDER, _WINDOW, _AUGMENT = 0x5A1D, 0x3E77, 0xA06E


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


def window_order(n: int, window: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of ``range(n)`` in which an item moves fewer than ``window`` places."""
    if window <= 1 or n <= 1:
        return np.arange(n)
    return np.argsort(np.arange(n) + rng.random(n) * window, kind="stable")


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
