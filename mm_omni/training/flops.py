"""Model FLOPs of a Qwen2.5-Omni micro-batch, and the device peaks, for ``--log-tps``'s MFU.

Model FLOPs count the matmuls of one forward and backward (3x the forward's), as MFU is usually
defined: recomputation is not counted, the causal mask halves the decoder's attention, the vision
encoder's attention is per window (``window_attn_size``) except in ``fullatt_block_indexes``
layers (per frame), the audio encoder's per ``n_window``-token chunk. Elementwise work (norms,
rotary, softmax) is left out. Per micro-batch the lengths come from the batch itself (packed
``cu_seqlens``, ``attention_mask`` or the padded shape), the media from ``*_grid_thw`` and
``feature_attention_mask``, so rows of any mix are counted as they are.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

logger = logging.getLogger(__name__)

# dense bf16/fp16 tensor-core peaks (TFLOP/s, no sparsity), matched on the device name
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("H20", 148.0),
               ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0))


def peak_tflops(device_name: str) -> Optional[float]:
    for key, value in PEAK_TFLOPS:
        if key in device_name:
            return value
    return None


def text_flops(cfg, row_lengths: Sequence[int]) -> float:
    """Decoder layers + output layer, fwd+bwd, for rows of these lengths."""
    h, f, layers = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers
    kv = h // cfg.num_attention_heads * cfg.num_query_groups
    per_token = 2 * (h * (h + 2 * kv) + h * h + 3 * h * f)
    tokens = sum(row_lengths)
    attention = sum(2 * s * s * h for s in row_lengths)  # QK^T and AV, 4 s^2 h, halved by the causal mask
    return 3 * (layers * (tokens * per_token + attention) + 2 * tokens * h * cfg.vocab_size)


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


def audio_flops(cfg, mel_frames: Sequence[int]) -> float:
    """Conv stem, blocks, pooled projection, fwd+bwd, for clips of these mel-frame lengths."""
    ha, fa, layers = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers
    total = 0.0
    for m in mel_frames:
        tokens = (m - 1) // 2 + 1
        total += (2 * m * cfg.num_mel_bins * 3 * ha + 2 * tokens * ha * 3 * ha
                  + layers * (2 * tokens * (4 * ha * ha + 2 * ha * fa) + 4 * ha * tokens * cfg.n_window)
                  + 2 * (tokens // 2) * ha * cfg.output_dim)
    return 3 * total


def row_lengths(batch: dict) -> list[int]:
    """Sequence lengths of a micro-batch: packed sequences, unpadded rows, or the padded shape."""
    cu = batch.get("cu_seqlens")
    if cu is not None:
        return (cu[1:] - cu[:-1]).tolist()
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return mask.sum(-1).tolist()
    b, s = batch["input_ids"].shape
    return [s] * b


def omni_batch_flops(model_cfg, batch: dict) -> float:
    """Model FLOPs (fwd+bwd) of one omni micro-batch through every module model.json defines."""
    text = model_cfg.text_decoder
    total = text_flops(text, row_lengths(batch))
    if model_cfg.image_encoder is not None:
        grids = [g for key in ("image_grid_thw", "video_grid_thw") if batch.get(key) is not None
                 for g in torch.as_tensor(batch[key]).tolist()]
        block = model_cfg.image_encoder
        total += vision_flops(block.vision_encoder, block.vision_projector, text.hidden_size, grids)
    mask = batch.get("feature_attention_mask")
    if model_cfg.audio_encoder is not None and mask is not None:
        total += audio_flops(model_cfg.audio_encoder.audio_encoder, mask.sum(-1).tolist())
    return total
