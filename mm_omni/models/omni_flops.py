"""Model FLOPs of an :class:`~mm_omni.models.omni.OmniModel` micro-batch, for ``--log-tps``'s MFU.

Model FLOPs count the matmuls of one forward and backward (3x the forward's), as MFU is usually
defined: recomputation is not counted, the causal mask halves the decoder's attention, the vision
encoder's attention is per window (``window_attn_size``) except in ``fullatt_block_indexes``
layers (per frame), the audio encoder's per ``n_window``-token chunk. Elementwise work (norms,
rotary, softmax) is left out. Per micro-batch the lengths come from the batch itself (packed
``cu_seqlens``, ``attention_mask`` or the padded shape), the media from ``*_grid_thw`` and
``feature_attention_mask``, so rows of any mix are counted as they are. Config only (no model): every
rank counts the whole model, whatever its pipeline stage holds.
"""

from __future__ import annotations

import torch

from mm_omni.models.audio.flops import audio_flops
from mm_omni.models.text.flops import row_lengths, text_flops
from mm_omni.models.vision.flops import vision_flops


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
