"""Model FLOPs of the vision encoder (matmuls, fwd+bwd: 3x the forward's), for --log-tps's MFU.

Attention is per window (``window_attn_size``) except in ``fullatt_block_indexes`` layers (per
frame); elementwise work is left out.
"""

from __future__ import annotations

from typing import Sequence


def vision_flops(encoder, projector, llm_hidden: int, grids: Sequence[Sequence[int]]) -> float:
    """Patch embedding, blocks, patch merger, fwd+bwd, for media of these ``(t, h, w)`` patch grids."""
    hv, fv, layers = encoder.hidden_size, encoder.ffn_hidden_size, encoder.num_layers
    window = (encoder.window_attn_size // encoder.patch_size) ** 2
    full = len(encoder.fullatt_block_indexes)
    embed = encoder.in_channels * encoder.temporal_patch_size * encoder.patch_size ** 2 * hv
    merged = encoder.spatial_merge_size ** 2 * hv
    total = 0.0
    for t, hh, ww in grids:
        patches = t * hh * ww
        attention = 4 * hv * patches * (window * (layers - full) + hh * ww * full)
        total += (2 * patches * embed + 2 * patches * layers * (4 * hv * hv + 3 * hv * fv) + attention
                  + 2 * patches // encoder.spatial_merge_size ** 2 * (merged * merged + merged * llm_hidden))
    return 3 * total
