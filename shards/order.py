"""The dataset's order and its cut into shards as arithmetic, not as arrays of every record.

`Shuffle(n, seed)` is a seeded bijection on [0, n): the kept record with global index j (its
place among the kept records, in listing order) goes to position `forward(j)`; the record at
position p is `inverse(p)`. It is a keyed Feistel network over the next even power of two (two
halves of h bits, _ROUNDS rounds of a keyed 64-bit mixer), walked in cycles until the value falls
inside [0, n): each step is a bijection of the larger domain, so the walk from a value of [0, n)
ends at a distinct value of [0, n). Any process computes the position of any record from (seed,
n, j) alone: no permutation of all records is held anywhere.

`blocks(...)`: shards are cut from positions. A block is `per` consecutive positions (`per` from
shard_size and the mean estimated bytes per record, from totals alone); a block is one shard
unless its estimated bytes exceed max_shard_bytes, and then it is cut where the running total
would pass it, as a sequential cut would. So a shard's records, and the shard count, follow from
the per-block totals (one number per block) and, for the rare block over the limit, its own
records' sizes.
"""
from __future__ import annotations

import hashlib

import numpy as np

_ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_TAR_BLOCK = 512
TAR_START = 1024  # what a cut counts before its first record (the tar's end blocks)
FILL = 0.9  # a block's records: about this share of max_shard_bytes on the mean estimate


def _mix(x: np.ndarray) -> np.ndarray:
    """A 64-bit mixer (splitmix64's finalizer): every output bit depends on every input bit."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


class Shuffle:
    """A seeded bijection on [0, n) (see the module's docstring)."""

    def __init__(self, n: int, seed: int):
        if n < 0:
            raise ValueError(f"n={n}: must be >= 0")
        self.n = n
        self.half = max(1, ((max(n - 1, 1)).bit_length() + 1) // 2)  # 2 * half bits cover [0, n)
        self.mask = np.uint64((1 << self.half) - 1)
        digest = hashlib.sha256(f"vitpipe-shuffle:{seed}:{n}".encode()).digest()
        self.keys = [np.uint64(int.from_bytes(digest[4 * r:4 * r + 8], "little")) for r in range(_ROUNDS)]

    def _rounds(self, x: np.ndarray, keys) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for key in keys:
            left, right = right, left ^ (_mix(right + key) & self.mask)
        return (left << h) | right

    def _unrounds(self, x: np.ndarray, keys) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for key in reversed(keys):
            left, right = right ^ (_mix(left + key) & self.mask), left
        return (left << h) | right

    def _walk(self, values, step) -> np.ndarray:
        x = np.asarray(values, dtype=np.uint64)
        if x.size and int(x.max()) >= self.n:
            raise ValueError(f"value {int(x.max())} outside [0, {self.n})")
        out = step(x, self.keys)
        outside = np.flatnonzero(out >= np.uint64(self.n))
        while len(outside):  # cycle-walking: apply again until inside
            out[outside] = step(out[outside], self.keys)
            outside = outside[out[outside] >= np.uint64(self.n)]
        return out.astype(np.int64)

    def forward(self, indices) -> np.ndarray:
        """The positions of kept indices (int64)."""
        return self._walk(indices, self._rounds)

    def inverse(self, positions) -> np.ndarray:
        """The kept indices at positions (int64)."""
        return self._walk(positions, self._unrounds)


def estimate_bytes(nbytes: np.ndarray, path_len: np.ndarray, non_ascii: np.ndarray) -> np.ndarray:
    """A record's estimated bytes in a tar: image header + data, cls (2 blocks), json (header +
    ~path-sized body), and PAX headers (6 blocks) when its key is not ASCII."""
    pad = lambda v: (v + _TAR_BLOCK - 1) // _TAR_BLOCK * _TAR_BLOCK  # noqa: E731
    return (_TAR_BLOCK * 4 + pad(2 * path_len.astype(np.int64) + 200) + pad(nbytes.astype(np.int64))
            + 6 * _TAR_BLOCK * non_ascii.astype(np.int64))


def records_per_block(n: int, total_est: int, shard_size: int, max_shard_bytes: int) -> int:
    """Positions per block: shard_size, or fewer when that many records of the mean estimated size
    would fill more than FILL of max_shard_bytes."""
    if n == 0:
        return shard_size
    fit = int(FILL * (max_shard_bytes - TAR_START) * n // max(total_est, 1))
    return max(1, min(shard_size, fit))


def block_totals(positions: np.ndarray, est: np.ndarray, per: int, n: int) -> np.ndarray:
    """Estimated bytes per block of the records at `positions` (a part of them: add the parts)."""
    return np.bincount(positions // per, weights=est, minlength=-(-n // per)).astype(np.int64)


def cut_block(est: np.ndarray, max_shard_bytes: int) -> list[int]:
    """Offsets in a block (its records' estimates in position order) where a new shard starts, 0
    first: a cut before a record that would take the running total past max_shard_bytes."""
    starts, size = [0], TAR_START
    for i, value in enumerate(est.tolist()):
        if i > starts[-1] and size + value > max_shard_bytes:
            starts.append(i)
            size = TAR_START
        size += value
    return starts


def shard_bounds(n: int, per: int, totals: np.ndarray, max_shard_bytes: int, est_of_block) -> list[tuple[int, int]]:
    """[lo, hi) positions of each shard. `totals`: block_totals of all records; `est_of_block(b)`:
    the estimates of block b's records in position order (asked only for a block over the limit)."""
    bounds = []
    for b, total in enumerate(totals.tolist()):
        lo, hi = b * per, min(n, (b + 1) * per)
        if TAR_START + total <= max_shard_bytes:
            bounds.append((lo, hi))
            continue
        starts = cut_block(est_of_block(b), max_shard_bytes)
        bounds += [(lo + a, lo + z) for a, z in zip(starts, starts[1:] + [hi - lo])]
    return bounds
