"""Qwen2.5-VL's config adapter: the transformers ``Qwen2_5_VLConfig`` -> model.json (:class:`OmniModelConfig`).

model.json is MindSpeed-MM's Qwen2.5-VL schema: top-level ``model_id`` "qwen2_5vl", ``image_encoder``
(vision encoder + projector) and ``text_decoder`` (``model_id`` "qwen2_5_lm"), no ``audio_encoder``.
"""

from __future__ import annotations

from mm_omni.config.model import (
    ImageEncoderBlock, OmniModelConfig, TextDecoderConfig, VisionEncoderConfig, VisionProjectorConfig,
)
from mm_omni.models.common.hf_activations import HF_ACTIVATIONS
from mm_omni.models.qwen2_5_vl.hf_fields import check_vl_config

MODEL_ID, TEXT_MODEL_ID = "qwen2_5vl", "qwen2_5_lm"


def config_from_hf(hf_config) -> OmniModelConfig:
    """Build the model.json of a transformers ``Qwen2_5_VLConfig`` (no parallel layout).

    Every field that changes transformers' math is carried over; a value we do not implement is refused first,
    by name (:func:`mm_omni.models.qwen2_5_vl.hf_fields.check_vl_config`; docs/hf_config_audit_qwen2_5_vl.md).
    """
    check_vl_config(hf_config)
    text, vision = hf_config.text_config, hf_config.vision_config
    rope = text.rope_parameters or {}
    vision_rope = vision.rope_parameters or {}
    return OmniModelConfig(
        model_id=MODEL_ID,
        image_token_id=hf_config.image_token_id,
        video_token_id=hf_config.video_token_id,
        vision_start_token_id=hf_config.vision_start_token_id,
        vision_end_token_id=hf_config.vision_end_token_id,
        image_encoder=ImageEncoderBlock(
            vision_encoder=VisionEncoderConfig(
                num_layers=vision.depth,
                hidden_size=vision.hidden_size,
                ffn_hidden_size=vision.intermediate_size,
                intermediate_size=vision.intermediate_size,
                llm_hidden_size=vision.out_hidden_size,
                num_attention_heads=vision.num_heads,
                gated_linear_unit=True,
                add_bias_linear=True,
                in_channels=vision.in_channels,
                patch_size=vision.patch_size,
                spatial_merge_size=vision.spatial_merge_size,
                temporal_patch_size=vision.temporal_patch_size,
                # the video time scale of the M-RoPE positions (the data pipeline reads it from config.json)
                tokens_per_second=vision.tokens_per_second,
                window_attn_size=vision.window_size,
                fullatt_block_indexes=list(vision.fullatt_block_indexes),
                activation_func=HF_ACTIVATIONS[vision.hidden_act],
                rope_theta=vision_rope.get("rope_theta", 10000.0),
            ),
            vision_projector=VisionProjectorConfig(
                input_size=vision.hidden_size,
                hidden_size=vision.out_hidden_size,
                ffn_hidden_size=vision.hidden_size * vision.spatial_merge_size**2,
                gated_linear_unit=False,
                add_bias_linear=True,
                activation_func="gelu",  # the merger's nn.GELU(): exact (erf), no config field
            ),
        ),
        text_decoder=TextDecoderConfig(
            model_id=TEXT_MODEL_ID,
            num_layers=text.num_hidden_layers,
            hidden_size=text.hidden_size,
            ffn_hidden_size=text.intermediate_size,
            num_attention_heads=text.num_attention_heads,
            num_query_groups=text.num_key_value_heads,
            vocab_size=text.vocab_size,
            max_position_embeddings=text.max_position_embeddings,
            rope_theta=rope.get("rope_theta", 1000000.0),
            mrope_section=list(rope.get("mrope_section", [16, 24, 24])),  # transformers' default when absent
            # transformers ties lm_head by the top-level flag (a pre-v5 text_config flag is forwarded to it)
            untie_embeddings_and_output_weights=not hf_config.tie_word_embeddings,
            layernorm_epsilon=text.rms_norm_eps,
            gated_linear_unit=True,
            activation_func=HF_ACTIVATIONS[text.hidden_act],
            attention_dropout=text.attention_dropout,
            add_bias_linear=False,
            add_qkv_bias=True,
            init_method_std=text.initializer_range,
            # torch's Embedding takes a negative padding_idx as counted from the end
            pad_token_id=None if text.pad_token_id is None else text.pad_token_id % text.vocab_size,
        ),
    )
