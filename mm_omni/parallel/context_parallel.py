"""Context parallelism (CP) on the batch side: padding a batch so every sequence splits, and the loss
mean over the ranks of a CP group.

The layout itself (which tokens a CP rank holds, the masks of its share, the K/V gather) is defined with
the attention core that computes with it, in :mod:`mm_omni.models.common.context_parallel`, and its
names are re-exported here; :mod:`mm_omni.parallel.decoder_layout` applies it to the decoder's input.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mm_omni.models.common.context_parallel import (  # noqa: F401  (re-exported: the CP layout)
    ContextParallelPackedSeqParams, ContextParallelSplit, gather_sequence, split_for_context_parallel, token_index,
    zigzag_chunks,
)


def pad_for_context_parallel(batch: dict, multiple: int, pad_id: int = 0, ignore_index: int = -100) -> dict:
    """Pad a collated text batch so CP (and sequence parallel) can split it.

    Padded batches (``[b, s]``) grow to a multiple of ``multiple`` with padding tokens at the end
    (``attention_mask`` 0 where there is one, label ``ignore_index``, positions continuing; causal
    attention never lets a real token see them); a packed row (``cu_seqlens``)
    gets padding at the end of every sequence that is not a multiple (label ``ignore_index``; the pads
    only ever attend within their own sequence, after its real tokens, so nothing real sees them).
    Media placeholders are untouched, so the encoders' features still scatter in order.
    """
    ids = batch["input_ids"]
    cu = batch.get("cu_seqlens")
    s = ids.shape[1]
    if cu is None:
        extra = -s % multiple
        if not extra:
            return batch
        keep = torch.arange(s + extra) < s
        where = torch.arange(s + extra).clamp(max=s - 1)
    else:
        bounds = cu.tolist()
        where, keep, new_cu = [], [], [0]
        for start, end in zip(bounds[:-1], bounds[1:]):
            n = end - start
            pad = -n % multiple
            where += list(range(start, end)) + [end - 1] * pad
            keep += [True] * n + [False] * pad
            new_cu.append(new_cu[-1] + n + pad)
        if len(where) == s:
            return batch
        where, keep = torch.tensor(where), torch.tensor(keep)
    out = dict(batch)
    out["input_ids"] = ids[:, where].masked_fill(~keep, pad_id)
    if batch.get("labels") is not None:
        out["labels"] = batch["labels"][:, where].masked_fill(~keep, ignore_index)
    if batch.get("attention_mask") is not None and batch["attention_mask"].dim() == 2:
        out["attention_mask"] = batch["attention_mask"][:, where] * keep.to(batch["attention_mask"].dtype)
    pos = batch.get("position_ids")
    if pos is not None:
        # padding continues from the last real position (+1, +2, ...): any value works, pads are never seen
        step = torch.where(keep, 0, torch.cumsum((~keep).long(), 0))
        out["position_ids"] = pos[..., where] + step.to(pos.dtype)
    if cu is not None:
        out["cu_seqlens"] = torch.tensor(new_cu, dtype=cu.dtype)
    return out


def mean_loss_over_group(per_token: torch.Tensor, mask: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Mean token loss over the tokens of all ranks of ``group`` (each holds a part of the sequence).

    Its value is the full mean on every rank; its gradient is this rank's share (local sum / global
    count), so gradients summed over the group (what DDP does over DP x CP) are the full mean's.
    """
    count = mask.detach().sum()
    dist.all_reduce(count, group=group)
    local = per_token.sum() / count.clamp(min=1)
    total = local.detach().clone()
    dist.all_reduce(total, group=group)
    return local + (total - local.detach())
