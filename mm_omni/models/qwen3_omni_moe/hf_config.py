"""Qwen3-Omni's config adapter: a transformers ``Qwen3OmniMoeConfig`` (or its thinker's) -> model.json."""

from __future__ import annotations

from mm_omni.config.model import TextDecoderConfig
from mm_omni.models.audio_aut.hf_config import from_hf_audio_config
from mm_omni.models.common.hf_activations import HF_ACTIVATIONS
from mm_omni.models.qwen3_omni_moe.config import AuTEncoderBlock, Qwen3ImageEncoderBlock, Qwen3OmniModelConfig
from mm_omni.models.qwen3_omni_moe.hf_fields import check_thinker_config, head_dim
from mm_omni.models.text.moe import aux_loss_coeff_from_hf
from mm_omni.models.vision_qwen3.hf_config import from_hf_vision_config


def thinker_of(hf_config):
    """The thinker config of a full ``Qwen3OmniMoeConfig`` (a bare thinker config as it is)."""
    return getattr(hf_config, "thinker_config", hf_config)


def config_from_hf(hf_config) -> Qwen3OmniModelConfig:
    """The registry's adapter."""
    return from_hf_thinker_config(thinker_of(hf_config))


def moe_layers(text) -> list[int]:
    """transformers' rule for which decoder layers are sparse: not in ``mlp_only_layers`` and
    ``(i + 1) % decoder_sparse_step == 0`` (1 = MoE)."""
    return [int(i not in text.mlp_only_layers and (i + 1) % text.decoder_sparse_step == 0)
            for i in range(text.num_hidden_layers)]


def from_hf_thinker_config(thinker) -> Qwen3OmniModelConfig:
    """model.json of a ``Qwen3OmniMoeThinkerConfig`` (no parallel layout); unsupported values are refused
    first, by name (:func:`~mm_omni.models.qwen3_omni_moe.hf_fields.check_thinker_config`)."""
    check_thinker_config(thinker)
    text = thinker.text_config
    rope = text.rope_parameters or {}
    pattern = moe_layers(text)
    vision_encoder, vision_projector = from_hf_vision_config(thinker.vision_config)
    return Qwen3OmniModelConfig(
        image_token_id=thinker.image_token_id,
        video_token_id=thinker.video_token_id,
        audio_token_id=thinker.audio_token_id,
        audio_start_token_id=thinker.audio_start_token_id,
        # not declared fields of the HF config: present only when config.json states them, else read from
        # the tokenizer at start-up
        audio_end_token_id=getattr(thinker, "audio_end_token_id", None),
        vision_start_token_id=getattr(thinker, "vision_start_token_id", None),
        vision_end_token_id=getattr(thinker, "vision_end_token_id", None),
        position_id_per_seconds=thinker.position_id_per_seconds,
        image_encoder=Qwen3ImageEncoderBlock(vision_encoder=vision_encoder, vision_projector=vision_projector),
        audio_encoder=AuTEncoderBlock(audio_encoder=from_hf_audio_config(thinker.audio_config)),
        text_decoder=TextDecoderConfig(
            model_id="qwen3_omni_moe_thinker",
            num_layers=text.num_hidden_layers,
            hidden_size=text.hidden_size,
            ffn_hidden_size=text.intermediate_size,
            num_attention_heads=text.num_attention_heads,
            num_query_groups=text.num_key_value_heads,
            kv_channels=head_dim(text),
            vocab_size=text.vocab_size,
            max_position_embeddings=text.max_position_embeddings,
            rope_theta=rope.get("rope_theta", 1000000.0),
            mrope_section=list(rope["mrope_section"]),
            mrope_interleaved=True,
            qk_layernorm=True,
            untie_embeddings_and_output_weights=not thinker.tie_word_embeddings,
            layernorm_epsilon=text.rms_norm_eps,
            gated_linear_unit=True,
            activation_func=HF_ACTIVATIONS[text.hidden_act],
            attention_dropout=text.attention_dropout,
            add_bias_linear=False,
            add_qkv_bias=bool(text.attention_bias),
            init_method_std=text.initializer_range,
            pad_token_id=None if text.pad_token_id is None else text.pad_token_id % text.vocab_size,
            num_moe_experts=text.num_experts,
            moe_router_topk=text.num_experts_per_tok,
            moe_ffn_hidden_size=text.moe_intermediate_size,
            moe_layer_freq=pattern,
            moe_router_pre_softmax=not text.norm_topk_prob,
            # megatron's dispatcher for expert parallelism (all-gather needs equal token counts on the EP ranks,
            # which packed rows of different lengths do not have); at EP 1 it is a local permutation
            moe_token_dispatcher_type="alltoall",
            moe_aux_loss_coeff=aux_loss_coeff_from_hf(text.router_aux_loss_coef, text.num_experts_per_tok,
                                                      sum(pattern)),
        ),
    )
