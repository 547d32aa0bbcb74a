"""Next-token cross entropy over a vocabulary split across tensor-parallel ranks.

Labels arrive unshifted, as transformers takes them (``-100`` = ignored); they are shifted by one
here so that position ``t`` predicts token ``t + 1``. In a packed row the last token of every
sequence gets no target (it must not predict the first token of the next sequence).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``labels`` [b, s] -> targets [b, s]: ``labels[:, t + 1]``, ``IGNORE_INDEX`` at every sequence end."""
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    if cu_seqlens is not None:
        ends = cu_seqlens[1:].to(labels.device, torch.long) - 1
        shifted[:, ends] = IGNORE_INDEX
    return shifted


def vocab_parallel_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss and its mask, both [b, s]; ``logits`` is megatron's [s, b, vocab / tp].

    megatron's kernel computes in fp32 and, for fp32 input, overwrites ``logits`` in place (the
    caller passes a copy when it still needs them). Ignored positions get target 0 and are zeroed
    by the mask, which also zeroes their gradient.
    """
    mask = targets != IGNORE_INDEX
    safe = targets.masked_fill(~mask, 0).transpose(0, 1).contiguous()  # [s, b]
    loss = tensor_parallel.vocab_parallel_cross_entropy(logits, safe).transpose(0, 1)
    mask = mask.to(loss.dtype)
    return loss * mask, mask


def mean_loss(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the label tokens of this micro-batch (0 when it has none)."""
    return per_token.sum() / mask.sum().clamp(min=1)
