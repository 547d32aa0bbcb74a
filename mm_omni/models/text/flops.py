"""Model FLOPs of the text decoder (matmuls, fwd+bwd: 3x the forward's), for --log-tps's MFU.

The causal mask halves the attention; elementwise work (norms, rotary, softmax) is left out. The
lengths come from the batch itself (:func:`row_lengths`: packed ``cu_seqlens``, ``attention_mask``
or the padded shape).
"""

from __future__ import annotations

from typing import Sequence

import torch


def text_flops(cfg, row_lengths: Sequence[int]) -> float:
    """Decoder layers + output layer, fwd+bwd, for rows of these lengths.

    Attention widths come from the head size (``kv_channels`` where set); a mixture-of-experts layer counts
    its router and the ``moe_router_topk`` experts each token runs through (active parameters), a dense
    layer its MLP."""
    h, layers = cfg.hidden_size, cfg.num_layers
    q = cfg.head_dim * cfg.num_attention_heads
    kv = cfg.head_dim * (cfg.num_query_groups if cfg.group_query_attention else cfg.num_attention_heads)
    attn_linear = h * (q + 2 * kv) + q * h
    dense = 3 * h * cfg.ffn_hidden_size
    if cfg.num_moe_experts is None:
        mlp = layers * dense
    else:
        n_moe = sum(moe_pattern(cfg))
        sparse = cfg.moe_router_topk * 3 * h * cfg.moe_ffn_hidden_size + h * cfg.num_moe_experts
        mlp = n_moe * sparse + (layers - n_moe) * dense
    tokens = sum(row_lengths)
    attention = sum(2 * s * s * q for s in row_lengths)  # QK^T and AV, 4 s^2 (heads x head_dim), halved by the mask
    return 3 * (tokens * 2 * (layers * attn_linear + mlp) + layers * attention + 2 * tokens * h * cfg.vocab_size)


def moe_pattern(cfg) -> list[bool]:
    """Which layers of the text decoder config are mixture-of-experts (``moe_layer_freq``: k or a 0/1 list)."""
    freq = cfg.moe_layer_freq
    if isinstance(freq, int):
        return [i % freq == 0 for i in range(cfg.num_layers)]
    return [bool(f) for f in freq]


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
