"""Model FLOPs of the Qwen3-VL-style vision encoder (matmuls, fwd+bwd: 3x the forward's), for MFU.

Attention is per frame; the ungated MLP has two matmuls; the final merger and every deepstack merger
each run ``4h x 4h`` and ``4h x out`` per merged token (``4h`` = ``hidden * m^2``); the learned-position
interpolation and other elementwise work are left out.
"""

from __future__ import annotations

from typing import Sequence


def qwen3_vision_flops(encoder, llm_hidden: int, grids: Sequence[Sequence[int]]) -> float:
    """Patch embedding, blocks, mergers, fwd+bwd, for media of these ``(t, h, w)`` patch grids;
    ``encoder`` is a :class:`~mm_omni.models.vision_qwen3.config.Qwen3VisionEncoderConfig`."""
    hv, layers = encoder.hidden_size, encoder.num_layers
    fv = encoder.ffn_hidden_size or encoder.intermediate_size
    embed = encoder.in_channels * encoder.temporal_patch_size * encoder.patch_size ** 2 * hv
    merged = encoder.spatial_merge_size ** 2 * hv
    mergers = 1 + len(encoder.deepstack_visual_indexes)
    total = 0.0
    for t, hh, ww in grids:
        patches = t * hh * ww
        attention = 4 * hv * patches * hh * ww * layers  # QK^T and AV within each frame of hh * ww patches
        total += (2 * patches * embed + 2 * patches * layers * (4 * hv * hv + 2 * hv * fv) + attention
                  + mergers * 2 * patches // encoder.spatial_merge_size ** 2 * (merged * merged + merged * llm_hidden))
    return 3 * total
