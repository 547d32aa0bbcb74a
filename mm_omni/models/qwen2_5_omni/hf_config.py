"""Qwen2.5-Omni's config adapter: the transformers thinker config -> model.json (:class:`OmniModelConfig`)."""

from __future__ import annotations

from mm_omni.config.model import (
    AudioEncoderBlock, AudioEncoderConfig, ImageEncoderBlock, OmniModelConfig, TextDecoderConfig, VisionEncoderConfig,
    VisionProjectorConfig,
)
from mm_omni.models.common.hf_activations import HF_ACTIVATIONS
from mm_omni.models.qwen2_5_omni.hf_fields import check_thinker_config


def thinker_of(hf_config):
    """The thinker config of a full ``Qwen2_5OmniConfig`` (or a bare thinker config as it is)."""
    return getattr(hf_config, "thinker_config", hf_config)


def config_from_hf(hf_config) -> OmniModelConfig:
    """The registry's adapter: a full Qwen2.5-Omni config (or its thinker's) -> model.json."""
    return from_hf_thinker_config(thinker_of(hf_config))


def from_hf_thinker_config(thinker) -> OmniModelConfig:
    """Build the model.json for a transformers ``Qwen2_5OmniThinkerConfig`` (no parallel layout).

    Every field that changes transformers' math is carried over; a value we do not implement is refused
    first, by name (:func:`mm_omni.models.qwen2_5_omni.hf_fields.check_thinker_config`; docs/hf_config_audit.md).
    """
    check_thinker_config(thinker)
    text, vision, audio = thinker.text_config, thinker.vision_config, thinker.audio_config
    rope = getattr(text, "rope_parameters", None) or {}
    mrope_section = rope.get("mrope_section") or (getattr(text, "rope_scaling", None) or {}).get(
        "mrope_section", [16, 24, 24]
    )
    vision_rope = getattr(vision, "rope_parameters", None) or {}
    return OmniModelConfig(
        image_token_id=thinker.image_token_index,
        video_token_id=thinker.video_token_index,
        audio_token_id=thinker.audio_token_index,
        audio_start_token_id=thinker.audio_start_token_id,
        audio_end_token_id=thinker.audio_end_token_id,
        # not declared fields of the HF config: present only when the checkpoint's config.json states them;
        # otherwise left unset and read from the tokenizer at start-up
        vision_start_token_id=getattr(thinker, "vision_start_token_id", None),
        vision_end_token_id=getattr(thinker, "vision_end_token_id", None),
        position_id_per_seconds=thinker.position_id_per_seconds,
        seconds_per_chunk=thinker.seconds_per_chunk,
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
                tokens_per_second=getattr(vision, "tokens_per_second", 2),
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
                activation_func="gelu",
            ),
        ),
        audio_encoder=AudioEncoderBlock(
            audio_encoder=AudioEncoderConfig(
                num_layers=audio.encoder_layers,
                hidden_size=audio.d_model,
                d_model=audio.d_model,
                ffn_hidden_size=audio.encoder_ffn_dim,
                num_attention_heads=audio.encoder_attention_heads,
                normalization="LayerNorm",
                activation_func=HF_ACTIVATIONS[audio.activation_function],
                add_bias_linear=True,
                layernorm_epsilon=1e-5,  # transformers' nn.LayerNorm default; no config field
                num_mel_bins=audio.num_mel_bins,
                max_source_positions=audio.max_source_positions,
                n_window=audio.n_window,
                scale_embedding=audio.scale_embedding,
                output_dim=audio.output_dim,
            )
        ),
        text_decoder=TextDecoderConfig(
            num_layers=text.num_hidden_layers,
            hidden_size=text.hidden_size,
            ffn_hidden_size=text.intermediate_size,
            num_attention_heads=text.num_attention_heads,
            num_query_groups=text.num_key_value_heads,
            vocab_size=text.vocab_size,
            max_position_embeddings=text.max_position_embeddings,
            rope_theta=rope.get("rope_theta", getattr(text, "rope_theta", 1000000.0)),
            mrope_section=list(mrope_section),
            # transformers ties the thinker's lm_head by the thinker's flag only (text_config's
            # defaults to True in transformers 5.23 and is ignored there)
            untie_embeddings_and_output_weights=not getattr(thinker, "tie_word_embeddings", False),
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
