"""Qwen2.5-Omni (thinker): Qwen2.5-VL vision encoder + Whisper-style audio encoder + M-RoPE Qwen2 decoder."""
