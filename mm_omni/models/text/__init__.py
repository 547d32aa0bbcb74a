"""Qwen2 text decoder with M-RoPE (embedding, megatron-core blocks, output layer, vocab-parallel loss)."""

from mm_omni.models.text.decoder import DecoderOutput, TextDecoder, text_transformer_config
from mm_omni.models.text.loss import IGNORE_INDEX, shift_labels

__all__ = ["DecoderOutput", "TextDecoder", "text_transformer_config", "IGNORE_INDEX", "shift_labels"]
