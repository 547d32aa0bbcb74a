"""Context parallelism (CP): which tokens a CP rank holds, the attention masks of its share, and the K/V gather.

Layout (causal load balancing, as megatron-core / TransformerEngine do it): every sequence is cut into
``2 * cp`` equal chunks and CP rank ``r`` holds chunks ``r`` and ``2cp - 1 - r`` ("zig-zag"), so every
rank gets the same amount of causal attention work. A padded batch ``[b, s]`` is cut along ``s``; a
packed row (``cu_seqlens``) is cut per packed sequence, like TE's THD layout, so each rank holds
``len / cp`` tokens of every sequence. Each sequence length must be a multiple of ``2 * cp``
(:func:`mm_omni.parallel.context_parallel.pad_for_context_parallel` pads a batch to that).

This module defines the layout and what the attention core computes with (it lives with the model
code because :mod:`mm_omni.models.common.attention` needs it: the gathered keys' positions, the masks,
the gather itself). Which tensors of a forward are split, and when, is the parallel layout's decision
(:mod:`mm_omni.parallel.decoder_layout`): the decoder's input *embeddings* after the encoders' features
have been scattered into them (the media placeholders of a sequence may fall on any rank), and with the
same token index the positions (M-RoPE stays exact: every token keeps its own 3D position), targets
(labels are shifted on the full sequence first) and the loss mask.

Attention: keys and values are all-gathered over the CP group (see
:mod:`mm_omni.models.common.attention`); the gathered rows come in rank order, i.e. in the order of
``kv_index`` below, so masks are written in global token positions: query ``q`` may see key ``k`` when
both are in the same sequence and ``pos(k) <= pos(q)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams


def zigzag_chunks(length: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Positions ``[length / cp]`` of one sequence that CP rank ``rank`` holds (chunks r and 2cp-1-r)."""
    if length % (2 * cp):
        raise ValueError(f"sequence length {length} is not divisible by 2 x context-parallel size = {2 * cp}: "
                         "pad every sequence to a multiple of it (pad_for_context_parallel)")
    c = length // (2 * cp)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c, device=device),
                      torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, device=device)])


def token_index(s: int, cp: int, rank: int, cu_seqlens: Optional[torch.Tensor] = None, device=None) -> torch.Tensor:
    """Positions in a row of length ``s`` that CP rank ``rank`` holds; per packed sequence with ``cu_seqlens``."""
    if cu_seqlens is None:
        return zigzag_chunks(s, cp, rank, device)
    bounds = cu_seqlens.tolist()
    if bounds[-1] != s:
        raise ValueError(f"cu_seqlens ends at {bounds[-1]} but the packed row holds {s} tokens")
    return torch.cat([start + zigzag_chunks(end - start, cp, rank, device)
                      for start, end in zip(bounds[:-1], bounds[1:])])


@dataclass
class ContextParallelSplit:
    """This rank's share of a batch of row length ``s`` (see the module docstring)."""

    group: dist.ProcessGroup
    index: torch.Tensor  # [s / cp]: positions in the full row that this rank holds, in local order
    kv_index: torch.Tensor  # [s]: position of every row of the gathered K/V (all ranks' ``index``, rank order)
    cu_seqlens: Optional[torch.Tensor] = None  # the full row's packed sequences (global positions)

    @property
    def size(self) -> int:
        return self.group.size()

    def take(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's tokens of ``t`` along ``dim`` (``s`` long)."""
        return t.index_select(dim, self.index.to(t.device))

    def local_cu_seqlens(self) -> Optional[torch.Tensor]:
        return None if self.cu_seqlens is None else torch.div(self.cu_seqlens, self.size, rounding_mode="floor")

    def attention_mask(self, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """megatron-style mask ``[b or 1, 1, s / cp, s]`` (True = masked) over (local queries, gathered keys).

        Causal in global positions, within one packed sequence; ``keep`` ``[b, s]`` (1 = token, HF style)
        masks padding keys, and a padding query keeps its own key so no row is fully masked.
        """
        q, k = self.index, self.kv_index.to(self.index.device)
        allowed = k[None, :] <= q[:, None]
        if self.cu_seqlens is not None:
            seg = torch.bucketize(torch.arange(int(self.cu_seqlens[-1]), device=q.device),
                                  self.cu_seqlens[1:].to(q.device, torch.long), right=True)
            allowed = allowed & (seg[q][:, None] == seg[k][None, :])
        allowed = allowed[None, None]
        if keep is not None:
            keep = keep.bool().to(q.device)
            allowed = (allowed & keep[:, None, None, :].index_select(-1, k)) | (k[None, :] == q[:, None])
        return ~allowed

    def packed_params(self) -> "ContextParallelPackedSeqParams":
        """Packed-sequence parameters for :class:`CoreAttention` (local queries vs. gathered keys)."""
        return ContextParallelPackedSeqParams.build(self)


@dataclass
class ContextParallelPackedSeqParams(PackedSeqParams):
    """Packed sequences under CP. The local queries form ``2 * n_seq`` segments (two chunks per
    sequence, ``cu_seqlens_q``); the keys of a segment are its sequence's gathered keys up to the end
    of that chunk (``kv_gather`` picks them from the gathered K/V, ``cu_seqlens_kv`` marks them), so
    a varlen kernel with bottom-right-aligned causal masking computes each segment exactly.
    :meth:`dense_mask` ([t / cp, t], True = masked) serves the masked-SDPA fallback (CPU, fp32); it is
    built on first use only, so the flash path never holds it."""

    kv_gather: Optional[torch.Tensor] = None
    split: Optional[ContextParallelSplit] = None
    _mask: Optional[torch.Tensor] = None

    def dense_mask(self) -> torch.Tensor:
        if self._mask is None:
            self._mask = self.split.attention_mask()[0, 0]
        return self._mask

    @classmethod
    def build(cls, split: ContextParallelSplit) -> "ContextParallelPackedSeqParams":
        cp, device = split.size, split.index.device
        bounds = split.cu_seqlens.tolist()
        # row of the gathered K/V that holds global position p
        row_of = torch.empty_like(split.kv_index)
        row_of[split.kv_index] = torch.arange(split.kv_index.numel(), device=split.kv_index.device)
        rank = split.group.rank()
        q_lens, kv_rows = [], []
        for start, end in zip(bounds[:-1], bounds[1:]):
            c = (end - start) // (2 * cp)
            for chunk in (rank, 2 * cp - 1 - rank):
                q_lens.append(c)
                kv_rows.append(row_of[start:start + (chunk + 1) * c])
        kv_lens = [r.numel() for r in kv_rows]
        zero = torch.zeros(1, dtype=torch.int32, device=device)
        cu_q = torch.cat([zero, torch.tensor(q_lens, device=device).cumsum(0).to(torch.int32)])
        cu_kv = torch.cat([zero, torch.tensor(kv_lens, device=device).cumsum(0).to(torch.int32)])
        return cls(qkv_format="sbhd", cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv, max_seqlen_q=max(q_lens),
                   max_seqlen_kv=max(kv_lens), kv_gather=torch.cat(kv_rows).to(device), split=split)


def split_for_context_parallel(group: Optional[dist.ProcessGroup], s: int, cu_seqlens: Optional[torch.Tensor] = None,
                               device=None) -> Optional[ContextParallelSplit]:
    """This rank's :class:`ContextParallelSplit` of rows of length ``s``; ``None`` without CP."""
    if group is None or group.size() == 1:
        return None
    cp, rank = group.size(), group.rank()
    cu = None if cu_seqlens is None else cu_seqlens.to("cpu", torch.long)
    index = token_index(s, cp, rank, cu).to(device)
    kv_index = torch.cat([token_index(s, cp, r, cu) for r in range(cp)]).to(device)
    return ContextParallelSplit(group=group, index=index, kv_index=kv_index,
                                cu_seqlens=None if cu is None else cu.to(device))


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 over ``group``; backward sums the gradients of every rank's copy and
    returns this rank's slice (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = x.new_empty((x.shape[0] * group.size(), *x.shape[1:]))
        dist.all_gather_into_tensor(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        group = ctx.group
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // group.size(), *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad, group=group)
        return out, None


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``x`` [s_local, ...] of every rank of ``group``, concatenated in rank order (differentiable)."""
    return _GatherSequence.apply(x, group)

