"""Model FLOPs of the text decoder (matmuls, fwd+bwd: 3x the forward's), for --log-tps's MFU.

The causal mask halves the attention; elementwise work (norms, rotary, softmax) is left out. The
lengths come from the batch itself (:func:`row_lengths`: packed ``cu_seqlens``, ``attention_mask``
or the padded shape).
"""

from __future__ import annotations

from typing import Sequence

import torch


def text_flops(cfg, row_lengths: Sequence[int]) -> float:
    """Decoder layers + output layer, fwd+bwd, for rows of these lengths."""
    h, f, layers = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers
    kv = h // cfg.num_attention_heads * cfg.num_query_groups
    per_token = 2 * (h * (h + 2 * kv) + h * h + 3 * h * f)
    tokens = sum(row_lengths)
    attention = sum(2 * s * s * h for s in row_lengths)  # QK^T and AV, 4 s^2 h, halved by the causal mask
    return 3 * (layers * (tokens * per_token + attention) + 2 * tokens * h * cfg.vocab_size)


def row_lengths(batch: dict) -> list[int]:
    """Sequence lengths of a micro-batch: packed sequences, unpadded rows, or the padded shape.

    Padding counts no FLOPs: in a packed row, a sequence's length is its ``attention_mask`` ones (the
    collator's padding sits at a sequence's end, or is a sequence of its own, which drops out)."""
    cu = batch.get("cu_seqlens")
    mask = batch.get("attention_mask")
    if cu is not None:
        cu = cu.long()
        if mask is None or mask.dim() != 2:
            return (cu[1:] - cu[:-1]).tolist()
        ones = torch.cat([mask.new_zeros(1), mask[0].long().cumsum(0)])
        return [n for n in (ones[cu[1:]] - ones[cu[:-1]]).tolist() if n]
    if mask is not None and mask.dim() == 2:
        return mask.sum(-1).tolist()
    b, s = batch["input_ids"].shape
    return [s] * b
