"""Qwen2.5-VL: the Qwen2.5-VL vision encoder (window attention, patch merger) + M-RoPE Qwen2 decoder."""
