"""Model FLOPs of a Qwen3-Omni thinker micro-batch (fwd+bwd matmuls), for ``--log-tps``'s MFU.

The same counting as :mod:`mm_omni.models.omni_flops` with this family's stacks: the MoE decoder by its active
parameters (router + top-k experts per token), the Qwen3 vision encoder with its deepstack mergers, AuT.
"""

from __future__ import annotations

import torch

from mm_omni.models.audio_aut.flops import aut_flops
from mm_omni.models.text.flops import row_lengths, text_flops
from mm_omni.models.vision_qwen3.flops import qwen3_vision_flops


def qwen3_omni_batch_flops(model_cfg, batch: dict) -> float:
    text = model_cfg.text_decoder
    total = text_flops(text, row_lengths(batch))
    if model_cfg.image_encoder is not None:
        grids = [g for key in ("image_grid_thw", "video_grid_thw") if batch.get(key) is not None
                 for g in torch.as_tensor(batch[key]).tolist()]
        total += qwen3_vision_flops(model_cfg.image_encoder.vision_encoder, text.hidden_size, grids)
    mask = batch.get("feature_attention_mask")
    if model_cfg.audio_encoder is not None and mask is not None:
        total += aut_flops(model_cfg.audio_encoder.audio_encoder, mask.sum(-1).tolist())
    return total
