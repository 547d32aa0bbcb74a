"""Qwen3-Omni-30B-A3B (MoE thinker): family folder."""
