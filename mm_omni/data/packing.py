"""Token-budget packing: rows into packs of at most ``budget`` tokens, and the sampler over packs.

The pack stream depends only on ``(seed, lengths, budget, window, shuffle, multiple)``:

- the row stream of epoch ``e`` is ``randperm(n, seed + e)`` (``0..n-1`` without shuffle), as in
  :class:`~mm_omni.data.sampler.ResumableBatchSampler`;
- it is cut into windows of ``window`` consecutive rows (the last one shorter) and each window is packed
  first-fit-decreasing: rows by length, longest first, ties by their place in the stream; each row goes
  into the first pack (in the order packs were opened) with room for it. A row is never split. A row's
  length counts rounded up to ``multiple`` (what context / sequence parallelism pads every sequence to,
  so the padded pack still fits);
- with shuffle, the packs of each window are put in a random order drawn from the same epoch generator
  (first-fit-decreasing opens the packs of the longest rows first, and those would otherwise always lead
  a window); without shuffle they keep their first-fit order. Inside a pack, rows keep stream order;
- epochs chain without gaps: the global stream is epoch 0's packs, then epoch 1's, and so on.

A pack is one *sample* of Megatron's ``consumed_samples`` and global batch size (as ms-swift's
``--packing``): every global step consumes ``micro_batch_size * dp_size`` consecutive packs and DP rank
``r`` takes the ``r``-th slice of ``micro_batch_size``; a micro-batch is the row indices of its packs, in
order, which the collator lays out as one ``[1, s]`` sequence (``cu_seqlens`` per row). Resuming from
``consumed_samples`` continues the stream exactly. Only the current epoch's packs are held; earlier
epochs leave their pack count behind (to find where a position falls), later ones are packed when
reached.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def first_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Packs (lists of indices into ``lengths``) of at most ``budget`` tokens, first-fit-decreasing.

    Each length must be at most ``budget``. A max-tree over the pack slots finds the first pack with
    room in O(log n); an unopened slot holds the whole budget, so when no open pack fits, the first
    unopened one is found, which is the next pack to open.
    """
    m = len(lengths)
    size = 1
    while size < m:
        size *= 2
    room = [budget] * (2 * size)  # room[size + k]: free tokens of pack k; inner nodes: the max below
    packs: list[list[int]] = []
    for i in sorted(range(m), key=lambda i: (-lengths[i], i)):
        need = lengths[i]
        node = 1
        while node < size:
            node = 2 * node if room[2 * node] >= need else 2 * node + 1
        slot = node - size
        if slot == len(packs):
            packs.append([])
        packs[slot].append(i)
        room[node] -= need
        while node > 1:  # up to the first ancestor whose max does not change
            node //= 2
            best = max(room[2 * node], room[2 * node + 1])
            if room[node] == best:
                break
            room[node] = best
    return [sorted(p) for p in packs]


@dataclass(frozen=True)
class PackStats:
    packs: int
    rows: int
    tokens: int  # real tokens of the rows
    budget: int
    max_rows: int

    @property
    def efficiency(self) -> float:
        """Real tokens / (packs x budget)."""
        return self.tokens / (self.packs * self.budget)

    def describe(self) -> str:
        return (f"token-budget packing: {self.packs} packs per epoch of {self.rows} rows, budget {self.budget} "
                f"tokens, efficiency {self.efficiency:.1%} (real tokens / (packs x budget)), rows per pack "
                f"mean {self.rows / self.packs:.2f} max {self.max_rows}")


def bucket_lengths(budget: int, micro_batch_size: int, multiple: int) -> tuple[int, ...]:
    """The lengths a budget-packed micro-batch is padded up to: ``k / 4`` of its ``micro_batch_size x
    budget`` tokens for ``k = 1..4``, each rounded up to ``multiple``, so the decoder sees at most four
    shapes (the largest holds any micro-batch)."""
    full = micro_batch_size * budget
    return tuple(sorted({round_up(math.ceil(k * full / 4), multiple) for k in range(1, 5)}))


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Infinite iterator over this DP rank's micro-batches of ``micro_batch_size`` packs (module docstring)."""

    def __init__(self, lengths: Sequence[int], budget: int, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, consumed_samples: int = 0, shuffle: bool = True,
                 window: int = 512, multiple: int = 1):
        n = len(lengths)
        if n <= 0 or budget <= 0 or micro_batch_size <= 0 or window <= 0 or multiple <= 0 \
                or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad sampler arguments: rows={n}, budget={budget}, micro_batch_size={micro_batch_size}, "
                             f"window={window}, multiple={multiple}, dp_rank={dp_rank}, dp_size={dp_size}")
        self.lengths = [int(x) for x in lengths]
        self.sizes = [round_up(x, multiple) for x in self.lengths]
        longest = max(range(n), key=self.sizes.__getitem__)
        if self.sizes[longest] > budget:
            raise ValueError(
                f"row {longest} has {self.lengths[longest]} tokens"
                f"{f' ({self.sizes[longest]} padded to a multiple of {multiple})' if multiple > 1 else ''}, more than "
                f"the packing budget of {budget} (--seq-length): set basic_parameters.cutoff_len to at most "
                f"{budget - budget % multiple} or raise --seq-length")
        self.n, self.budget, self.mbs, self.rank, self.dp = n, budget, micro_batch_size, dp_rank, dp_size
        self.seed, self.shuffle, self.window = seed, shuffle, window
        self.consumed_samples = consumed_samples
        self._starts = [0]  # _starts[e]: global position of epoch e's first pack (epochs packed so far)
        self._epoch, self._packs = -1, None

    def epoch_packs(self, epoch: int) -> list[list[int]]:
        """Epoch ``epoch``'s packs, each a list of dataset indices (computed, not cached)."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
        packs: list[list[int]] = []
        for start in range(0, self.n, self.window):
            rows = order[start:start + self.window]
            window = [[rows[i] for i in p] for p in first_fit_decreasing([self.sizes[r] for r in rows], self.budget)]
            if self.shuffle:
                window = [window[i] for i in torch.randperm(len(window), generator=g).tolist()]
            packs += window
        return packs

    def stats(self, epoch: int = 0) -> PackStats:
        self._set_epoch(epoch)  # the epoch that is read next, usually: keep it
        packs = self._packs
        return PackStats(packs=len(packs), rows=self.n, tokens=sum(self.lengths), budget=self.budget,
                         max_rows=max(map(len, packs)))

    def _at(self, position: int) -> list[int]:
        while self._starts[-1] <= position:  # pack the epochs up to this position, keeping their counts
            epoch = len(self._starts) - 1
            self._set_epoch(epoch)
            self._starts.append(self._starts[-1] + len(self._packs))
        epoch = bisect.bisect_right(self._starts, position) - 1
        self._set_epoch(epoch)
        return self._packs[position - self._starts[epoch]]

    def _set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._packs, self._epoch = self.epoch_packs(epoch), epoch

    def __iter__(self) -> Iterator[list[int]]:
        step = self.mbs * self.dp
        while True:
            start = self.consumed_samples + self.rank * self.mbs
            yield [i for p in range(start, start + self.mbs) for i in self._at(p)]
            self.consumed_samples += step
