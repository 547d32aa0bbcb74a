"""Encoders as pure data parallel inside a decoder tensor(-and-context)-parallel group (``--hetero-parallel``).

The ranks of one decoder TP group (TP x CP group when the decoder runs context parallel) share a
micro-batch. With an encoder at ``tp: 1`` each of them
encodes a cost-balanced share of the micro-batch's media (:func:`~mm_omni.parallel.balance.lpt_assign`
over patch counts / mel frames) with its own full (tp=1) copy of the encoder, and an autograd-aware
all-gather rebuilds the full feature tensor, in the original order, on every rank of the group.

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
    """Runs an encoder on this rank's share of the media and gathers the features over ``group``.

    ``width``: the features' width (the text decoder's hidden size); ``merge``: vision tokens per
    patch block (``spatial_merge_size ** 2``).
    """

    def __init__(self, group, width: int, merge: int, cp_group=None, balance: str = "cost"):
        if balance not in ("cost", "count"):
            raise ValueError(f"balance={balance!r}: expected 'cost' or 'count'")
        self.group, self.width, self.merge, self.cp_group = group, width, merge, cp_group
        self.balance = balance
        self.size, self.rank = group.size(), group.rank()
        self.stats: dict[str, list] = {}  # kind -> [calls, sum of imbalance, worst]

    def vision(self, encoder, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
               dummy: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
        patches = grid_thw.prod(-1).tolist()
        owners = self._assign("vision", patches)
        mine = [i for i, o in enumerate(owners) if o == self.rank]
        local = None
        if mine:
            starts = [0]
            for p in patches:
                starts.append(starts[-1] + p)
            rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in mine]).to(pixel_values.device)
            local = encoder(pixel_values.index_select(0, rows), grid_thw[torch.tensor(mine)])
        return self._gather(encoder, local, [p // self.merge for p in patches], owners, dummy)

    def audio(self, encoder, input_features: torch.Tensor, feature_lens: torch.Tensor,
              dummy: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
        from mm_omni.models.audio.front_end import conv_output_lengths

        frames = feature_lens.tolist()
        owners = self._assign("audio", frames)
        mine = [i for i, o in enumerate(owners) if o == self.rank]
        local = None
        if mine:
            idx = torch.tensor(mine)
            lens = feature_lens[idx.to(feature_lens.device)]
            if input_features.dim() == 3:  # padded [n_audio, mel, T]
                feats = input_features.index_select(0, idx.to(input_features.device))
            else:  # transformers' flat valid frames [mel, sum(lens)]
                starts = [0]
                for f in frames:
                    starts.append(starts[-1] + f)
                cols = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in mine])
                feats = input_features.index_select(1, cols.to(input_features.device))
            local = encoder(feats, lens)
        tokens = conv_output_lengths(feature_lens.cpu())[1].tolist()
        return self._gather(encoder, local, tokens, owners, dummy)

    # -- internals ---------------------------------------------------------------------------
    def _assign(self, kind: str, costs: list[int]) -> list[int]:
        if self.balance == "cost":
            owners = lpt_assign(costs, self.size)
        else:  # equal item counts, in order (what a split by rows does): the baseline of bench/hetero.py
            owners = [i * self.size // len(costs) for i in range(len(costs))]
        ratio = imbalance(costs, owners, self.size)
        calls, total, worst = self.stats.get(kind, [0, 0.0, 1.0])
        self.stats[kind] = [calls + 1, total + ratio, max(worst, ratio)]
        level = logging.INFO if calls == 0 and dist.get_rank() == 0 else logging.DEBUG
        logger.log(level, "hetero %s encoder: %d items over %d ranks, cost per rank %s, imbalance max/mean "
                   "%.3f (running mean %.3f, worst %.3f)", kind, len(costs), self.size,
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
            # an empty share: a dummy forward keeps every parameter in this rank's backward (DESIGN §3)
            full = full + 0.0 * dummy().sum().to(full.dtype)
        return full
