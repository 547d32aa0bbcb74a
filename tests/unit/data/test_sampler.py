"""The sampler: same global order on any DP size, exact resume from consumed_samples."""

from __future__ import annotations

from itertools import islice

from mm_omni.data.sampler import ResumableBatchSampler


def _global_stream(n, mbs, dp, steps, consumed=0, seed=3):
    samplers = [iter(ResumableBatchSampler(n, mbs, r, dp, seed=seed, consumed_samples=consumed)) for r in range(dp)]
    out = []
    for _ in range(steps):
        for s in samplers:
            out.extend(next(s))
    return out


def test_same_order_on_any_dp_size():
    a = _global_stream(10, 2, 1, 12)
    b = _global_stream(10, 2, 2, 6)
    c = _global_stream(10, 1, 4, 6)
    assert a == b and a[:24] == c
    assert sorted(a[:10]) == list(range(10)) and sorted(a[10:20]) == list(range(10))  # epochs are permutations
    assert a[:10] != a[10:20]  # a new permutation every epoch


def test_resume_exactly():
    full = _global_stream(7, 2, 2, 10)
    resumed = _global_stream(7, 2, 2, 6, consumed=16)
    assert full[16:] == resumed[: len(full) - 16]
    # resuming on another DP size continues the same stream
    assert _global_stream(7, 2, 4, 2, consumed=16) == full[16:32]


def test_no_shuffle_and_rank_slices():
    s = ResumableBatchSampler(5, 2, dp_rank=1, dp_size=2, shuffle=False)
    assert list(islice(iter(s), 3)) == [[2, 3], [1, 2], [0, 1]]
