"""Deterministic, resumable micro-batch sampler with data-parallel slicing.

The global sample stream is epoch after epoch of ``randperm(n, seed + epoch)`` (or ``0..n-1`` without
shuffle), chained without gaps, so it depends only on ``(seed, n)``: never on the DP size. Every
global step consumes ``micro_batch_size * dp_size`` consecutive samples of the stream and rank ``r``
takes the ``r``-th slice of ``micro_batch_size``. Resuming from ``consumed_samples`` (Megatron's
counter, global over DP) continues the stream exactly where it stopped, on any DP size whose global
step divides the position. Since epochs chain, no partial batch exists; ``drop_last`` is accepted for
MindSpeed-MM compatibility and changes nothing.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """Infinite iterator over this DP rank's micro-batches of dataset indices."""

    def __init__(self, n: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, consumed_samples: int = 0, shuffle: bool = True):
        if n <= 0 or micro_batch_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad sampler arguments: n={n}, micro_batch_size={micro_batch_size}, "
                             f"dp_rank={dp_rank}, dp_size={dp_size}")
        self.n, self.mbs, self.rank, self.dp = n, micro_batch_size, dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.consumed_samples = consumed_samples
        self._epoch, self._order = -1, None

    def _at(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch != self._epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._order = torch.randperm(self.n, generator=g).tolist()
            else:
                self._order = list(range(self.n))
            self._epoch = epoch
        return self._order[offset]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.mbs * self.dp
        while True:
            start = self.consumed_samples + self.rank * self.mbs
            yield [self._at(p) for p in range(start, start + self.mbs)]
            self.consumed_samples += step
