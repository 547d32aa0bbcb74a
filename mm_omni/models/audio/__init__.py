"""Qwen2.5-Omni's Whisper-style audio encoder (conv front end, chunked attention, pooling, projector)."""

from mm_omni.models.audio.encoder import AudioEncoder, audio_transformer_config

__all__ = ["AudioEncoder", "audio_transformer_config"]
