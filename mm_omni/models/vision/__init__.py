"""Qwen2.5-VL vision encoder (Qwen2.5-Omni's ``visual``) on megatron-core."""

from mm_omni.models.vision.encoder import VisionEncoder, VisionTransformer
from mm_omni.models.vision.window_index import VisionLayout, vision_layout

__all__ = ["VisionEncoder", "VisionTransformer", "VisionLayout", "vision_layout"]
