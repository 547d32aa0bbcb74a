"""A transformers ``Qwen3OmniMoeAudioEncoderConfig`` -> our module config."""

from __future__ import annotations

from mm_omni.models.audio_aut.config import AuTEncoderConfig
from mm_omni.models.audio_aut.hf_fields import check_audio_config
from mm_omni.models.common.hf_activations import HF_ACTIVATIONS


def from_hf_audio_config(audio) -> AuTEncoderConfig:
    check_audio_config(audio)
    return AuTEncoderConfig(
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
        n_window_infer=audio.n_window_infer,
        conv_chunksize=audio.conv_chunksize,
        downsample_hidden_size=audio.downsample_hidden_size,
        scale_embedding=audio.scale_embedding,
        output_dim=audio.output_dim,
    )
