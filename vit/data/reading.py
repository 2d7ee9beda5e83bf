"""Reading samples out of shard segments: a lane's samples in its shuffled order, a segment's
samples as raw tar members (skipping, re-opening a dropped stream, counting a broken tar)."""
from __future__ import annotations

import contextlib
import logging
import tarfile
import zlib
from typing import BinaryIO, Callable, Iterator, Sequence

import numpy as np

from shards.format import TarMembers, split_name
from vit.data.order import Segment

log = logging.getLogger(__name__)

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
