"""model.json vision configs -> megatron-core ``TransformerConfig`` (through the shared translation)."""

from __future__ import annotations

from megatron.core.transformer.transformer_config import TransformerConfig

from mm_omni.config.model import VisionEncoderConfig, VisionProjectorConfig
from mm_omni.models.common.transformer_config import megatron_transformer_config


def vision_transformer_config(cfg: VisionEncoderConfig) -> TransformerConfig:
    """The ViT blocks: MHA with q/k/v biases, RMSNorm, SwiGLU with biases."""
    heads = cfg.num_attention_heads
    if heads is None or cfg.hidden_size % heads:
        raise ValueError(f"vision_encoder.num_attention_heads={heads} must divide hidden_size={cfg.hidden_size}")
    return megatron_transformer_config(
        cfg,
        ffn_hidden_size=cfg.ffn_hidden_size or cfg.intermediate_size,
        num_query_groups=heads,
        kv_channels=cfg.hidden_size // heads,
        add_qkv_bias=True,
    )


def projector_transformer_config(cfg: VisionProjectorConfig, spatial_merge_size: int) -> TransformerConfig:
    """fc1: ``input_size * m^2 -> ffn_hidden_size``; fc2: ``ffn_hidden_size -> hidden_size`` (the LLM's)."""
    return megatron_transformer_config(
        cfg,
        num_layers=1,
        ffn_hidden_size=cfg.ffn_hidden_size or cfg.input_size * spatial_merge_size**2,
        num_attention_heads=cfg.num_attention_heads or 1,  # required by TransformerConfig, unused by an MLP
    )
