"""Encoders as pure data parallel inside a decoder tensor(-and-context)-parallel group (``--hetero-parallel``).

The ranks of one decoder TP group (TP x CP group when the decoder runs context parallel) share a
micro-batch. With an encoder at ``tp: 1`` each of them encodes a cost-balanced share of the
micro-batch's media items (:func:`~mm_omni.parallel.balance.lpt_assign` over the costs the encoder
declares, :class:`~mm_omni.models.common.encoder_api.ItemEncoder`) with its own full (tp=1) copy of
the encoder, and an autograd-aware all-gather rebuilds the full feature tensor, in the original order,
on every rank of the group.

Backward: the gradient w.r.t. the gathered features is the same on every rank of the group
(megatron keeps the gradient of a TP-replicated activation replicated: the column-parallel input
and the sequence-parallel scatter both reduce it), so each rank keeps the rows it produced and no
communication is needed; with context parallelism each CP rank's gradient covers its own chunk of
the sequence, so it is first summed over the CP group. The encoder parameters' gradients are then partial sums over the group's
shares; :meth:`mm_omni.parallel.hetero.HeteroEncoders.reduce_grads` sums them over the group.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.distributed as dist

from mm_omni.models.common.encoder_api import ItemEncoder
from mm_omni.parallel.balance import imbalance, lpt_assign, rank_loads

logger = logging.getLogger(__name__)


class _GatherRows(torch.autograd.Function):
    """``local [n_mine, h]`` -> ``full [n, h]``: rows of every rank, put in the original order.

    ``index[j]`` is where full row ``j`` sits in the concatenation of the ranks' buffers
    (each padded to ``max_rows``); ``mine`` lists the full rows this rank produced, in its local order.
    """

    @staticmethod
    def forward(ctx, local, index, mine, max_rows, group, cp_group):
        padded = local.new_zeros(max_rows, local.shape[1])
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(group.size())]
        dist.all_gather(parts, padded, group=group)
        ctx.save_for_backward(mine)
        ctx.cp_group = cp_group
        return torch.cat(parts).index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (mine,) = ctx.saved_tensors
        if ctx.cp_group is not None:
            # each context-parallel rank's loss covers its own chunk of the sequence: the features'
            # gradient is the sum over the CP group (equal over TP peers, as said above)
            grad = grad.contiguous()
            dist.all_reduce(grad, group=ctx.cp_group)
        return grad.index_select(0, mine), None, None, None, None, None


class EncoderDataParallel:
    """Runs an encoder on this rank's share of the media items and gathers the features over ``group``.

    ``width``: the features' width (the text decoder's hidden size).
    """

    def __init__(self, group, width: int, cp_group=None, balance: str = "cost"):
        if balance not in ("cost", "count"):
            raise ValueError(f"balance={balance!r}: expected 'cost' or 'count'")
        self.group, self.width, self.cp_group = group, width, cp_group
        self.balance = balance
        self.size, self.rank = group.size(), group.rank()
        self.stats: dict[str, list] = {}  # encoder name -> [calls, sum of imbalance, worst]

    def encode(self, name: str, encoder: ItemEncoder, data: torch.Tensor, sizes: torch.Tensor,
               dummy: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
        """``encoder(data, sizes)`` of every item, each item encoded on one rank of the group."""
        owners = self._assign(name, encoder.item_costs(sizes))
        mine = [i for i, o in enumerate(owners) if o == self.rank]
        local = encoder(*encoder.take_items(data, sizes, mine)) if mine else None
        return self._gather(encoder, local, encoder.item_tokens(sizes), owners, dummy)

    # -- internals ---------------------------------------------------------------------------
    def _assign(self, name: str, costs: list[int]) -> list[int]:
        if self.balance == "cost":
            owners = lpt_assign(costs, self.size)
        else:  # equal item counts, in order (what a split by rows does): the baseline of bench/hetero.py
            owners = [i * self.size // len(costs) for i in range(len(costs))]
        ratio = imbalance(costs, owners, self.size)
        calls, total, worst = self.stats.get(name, [0, 0.0, 1.0])
        self.stats[name] = [calls + 1, total + ratio, max(worst, ratio)]
        level = logging.INFO if calls == 0 and dist.get_rank() == 0 else logging.DEBUG
        logger.log(level, "hetero %s split: %d items over %d ranks, cost per rank %s, imbalance max/mean "
                   "%.3f (running mean %.3f, worst %.3f)", name, len(costs), self.size,
                   rank_loads(costs, owners, self.size), ratio, (total + ratio) / (calls + 1), max(worst, ratio))
        return owners

    def _gather(self, encoder, local, tokens: list[int], owners: list[int], dummy) -> torch.Tensor:
        weight = next(encoder.parameters())
        if local is None:
            local = torch.zeros(0, self.width, dtype=weight.dtype, device=weight.device)
        counts = rank_loads(tokens, owners, self.size)
        max_rows = max(counts)
        index, mine, next_row, start = [], [], [0] * self.size, 0
        for n, owner in zip(tokens, owners):
            base = owner * max_rows + next_row[owner]
            index.append(torch.arange(base, base + n))
            if owner == self.rank:
                mine.append(torch.arange(start, start + n))
            next_row[owner] += n
            start += n
        if local.shape[0] != counts[self.rank]:
            raise RuntimeError(f"rank {self.rank} encoded {local.shape[0]} rows but its share has "
                               f"{counts[self.rank]}: encoder token counts and the cost bookkeeping disagree")
        mine_t = torch.cat(mine) if mine else torch.zeros(0, dtype=torch.long)
        full = _GatherRows.apply(local, torch.cat(index).to(local.device), mine_t.to(local.device),
                                 max_rows, self.group, self.cp_group)
        if not mine and dummy is not None:
            # an empty share: a dummy forward keeps every parameter in this rank's backward
            full = full + 0.0 * dummy().sum().to(full.dtype)
        return full
