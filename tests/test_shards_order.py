"""shards.order: the seeded bijection that gives each kept record its position, and the cut of
positions into shards from per-block totals."""
from __future__ import annotations

import numpy as np
import pytest

from shards.order import TAR_START, Shuffle, block_totals, cut_block, records_per_block, shard_bounds


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 64, 65, 1000, 4097, 100_003])
def test_shuffle_is_a_bijection_and_inverse_undoes_it(n):
    for seed in (0, 1, 12345):
        shuffle = Shuffle(n, seed)
        positions = shuffle.forward(np.arange(n))
        assert np.array_equal(np.sort(positions), np.arange(n))
        assert np.array_equal(shuffle.inverse(positions), np.arange(n))
        # a record's position is the same computed alone, in any chunk, in any process
        if n:
            picks = np.array([n - 1, 0, n // 2])
            assert np.array_equal(Shuffle(n, seed).forward(picks), positions[picks])


def test_shuffle_depends_on_the_seed_and_mixes():
    n = 10_000
    a, b = Shuffle(n, 0).forward(np.arange(n)), Shuffle(n, 1).forward(np.arange(n))
    assert not np.array_equal(a, b)
    assert np.array_equal(a, Shuffle(n, 0).forward(np.arange(n)))
    # no order survives: neighbours land far apart, positions are uncorrelated with indices
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.05
    assert np.median(np.abs(np.diff(a))) > n / 10
    # where record 0 lands over 2000 seeds: spread over all 10 tenths of [0, 100)
    first = np.array([Shuffle(100, seed).forward(np.array([0]))[0] for seed in range(2000)])
    counts = np.bincount(first // 10, minlength=10)
    assert counts.min() > 150 and counts.max() < 250, counts


def test_shuffle_rejects_values_outside_its_range():
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        Shuffle(5, 0).forward(np.array([5]))


def _greedy(est, shard_size, max_bytes):
    """The cut of one sequential pass (what plan._split did over the whole order), per block."""
    bounds, lo, size = [], 0, TAR_START
    for i, value in enumerate(est.tolist()):
        if i > lo and (i - lo >= shard_size or size + value > max_bytes):
            bounds.append((lo, i))
            lo, size = i, TAR_START
        size += value
    return bounds + [(lo, len(est))]


@pytest.mark.parametrize("seed", range(5))
def test_shard_bounds_cover_every_position_within_both_limits(seed):
    rng = np.random.default_rng(seed)
    n = 5000
    est = rng.lognormal(9, 1.0, n).astype(np.int64) + 2048  # ~ImageNet-like spread of sizes
    max_bytes, shard_size = 2_000_000, 300
    per = records_per_block(n, int(est.sum()), shard_size, max_bytes)
    assert 1 <= per <= shard_size
    totals = block_totals(np.arange(n), est, per, n)
    # the totals add up across any partition of the records (each part adds its own)
    parts = np.array_split(rng.permutation(n), 7)
    assert np.array_equal(sum(block_totals(p, est[p], per, n) for p in parts), totals)
    asked = []
    bounds = shard_bounds(n, per, totals, max_bytes, lambda b: asked.append(b) or est[b * per:(b + 1) * per])
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(hi == lo2 for (_, hi), (lo2, _) in zip(bounds, bounds[1:]))
    for lo, hi in bounds:
        assert 1 <= hi - lo <= shard_size
        assert hi - lo == 1 or TAR_START + est[lo:hi].sum() <= max_bytes
    # only blocks over the limit were read, and those were cut as one sequential pass cuts them
    for b in asked:
        assert TAR_START + totals[b] > max_bytes
        block = est[b * per:(b + 1) * per]
        assert cut_block(block, max_bytes) == [lo for lo, _ in _greedy(block, per, max_bytes)]


def test_shard_bounds_without_a_byte_limit_are_fixed_counts():
    n, shard_size = 23, 7
    est = np.full(n, 5000)
    per = records_per_block(n, int(est.sum()), shard_size, 10**9)
    assert per == 7
    bounds = shard_bounds(n, per, block_totals(np.arange(n), est, per, n), 10**9, None)
    assert bounds == [(0, 7), (7, 14), (14, 21), (21, 23)]


def test_a_record_larger_than_the_limit_gets_a_shard_of_its_own():
    est = np.array([1000, 5_000_000, 1000, 1000])
    bounds = shard_bounds(4, 4, block_totals(np.arange(4), est, 4, 4), 100_000, lambda b: est)
    assert bounds == [(0, 1), (1, 2), (2, 4)]
