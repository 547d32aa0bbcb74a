"""A transformers Qwen3-VL-style vision config -> our module configs (encoder and merger)."""

from __future__ import annotations

from mm_omni.config.model import VisionProjectorConfig
from mm_omni.models.common.hf_activations import HF_ACTIVATIONS
from mm_omni.models.vision_qwen3.config import Qwen3VisionEncoderConfig
from mm_omni.models.vision_qwen3.hf_fields import check_vision_config

LAYERNORM_EPS = 1e-6  # transformers' vision blocks and mergers: nn.LayerNorm(..., eps=1e-6), no config field


def from_hf_vision_config(vision) -> tuple[Qwen3VisionEncoderConfig, VisionProjectorConfig]:
    """``(vision_encoder, vision_projector)`` of a ``Qwen3OmniMoeVisionEncoderConfig`` (or Qwen3-VL's); the
    deepstack mergers share the projector config (they differ only in where the norm sits)."""
    check_vision_config(vision)
    rope = getattr(vision, "rope_parameters", None) or {}
    encoder = Qwen3VisionEncoderConfig(
        num_layers=vision.depth,
        hidden_size=vision.hidden_size,
        ffn_hidden_size=vision.intermediate_size,
        intermediate_size=vision.intermediate_size,
        llm_hidden_size=vision.out_hidden_size,
        num_attention_heads=vision.num_heads,
        gated_linear_unit=False,
        add_bias_linear=True,
        normalization="LayerNorm",
        layernorm_epsilon=LAYERNORM_EPS,
        activation_func=HF_ACTIVATIONS[vision.hidden_act],
        in_channels=vision.in_channels,
        patch_size=vision.patch_size,
        spatial_merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size,
        num_position_embeddings=vision.num_position_embeddings,
        deepstack_visual_indexes=list(vision.deepstack_visual_indexes),
        rope_theta=rope.get("rope_theta", 10000.0),
    )
    projector = VisionProjectorConfig(
        input_size=vision.hidden_size,
        hidden_size=vision.out_hidden_size,
        ffn_hidden_size=vision.hidden_size * vision.spatial_merge_size**2,
        gated_linear_unit=False,
        add_bias_linear=True,
        normalization="LayerNorm",
        layernorm_epsilon=LAYERNORM_EPS,
        activation_func="gelu",  # transformers' merger: nn.GELU(), the exact one
    )
    return encoder, projector
