"""Shared test fixtures: tiny Qwen2.5-Omni configs (nothing is downloaded)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MM_OMNI_DEVICE", "cpu")

# Special token ids of the tiny models (inside the tiny vocab of 1024).
TINY_TOKEN_IDS = dict(
    image_token_index=1000,
    video_token_index=1001,
    audio_token_index=1002,
    vision_start_token_id=1003,
    vision_end_token_id=1004,
    audio_start_token_id=1005,
    audio_end_token_id=1006,
)


def tiny_thinker_config(**overrides):
    """A transformers ``Qwen2_5OmniThinkerConfig`` small enough for CPU parity tests in fp32."""
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniThinkerConfig

    text = dict(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        tie_word_embeddings=False,
    )
    vision = dict(
        # 44: not a multiple of 8, like the 7B's 3420, so the MLP's padded (aligned) fc2 path is what is checked
        depth=4, hidden_size=32, intermediate_size=44, num_heads=2, in_channels=3, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=56, out_hidden_size=64,
        fullatt_block_indexes=[1, 3], hidden_act="silu",
    )
    audio = dict(
        num_mel_bins=128, encoder_layers=3, encoder_attention_heads=4, encoder_ffn_dim=64, d_model=32,
        max_source_positions=1500, n_window=8, output_dim=64,
    )
    text.update(overrides.pop("text", {}))
    vision.update(overrides.pop("vision", {}))
    audio.update(overrides.pop("audio", {}))
    kwargs = dict(TINY_TOKEN_IDS, text_config=text, vision_config=vision, audio_config=audio)
    kwargs.update(overrides)
    cfg = Qwen2_5OmniThinkerConfig(**kwargs)
    cfg._attn_implementation = "sdpa"
    for sub in (cfg.text_config, cfg.vision_config, cfg.audio_config):
        sub._attn_implementation = "sdpa"
    return cfg


@pytest.fixture
def thinker_config():
    return tiny_thinker_config()
