"""Qwen2.5-VL vision encoder (Qwen2.5-Omni's ``visual``) on megatron-core.

The names below are imported on first use: the converter reads this stack's ``hf_mapping`` table without
importing megatron.
"""

from importlib import import_module

_EXPORTS = {"VisionEncoder": "encoder", "VisionTransformer": "encoder", "VisionLayout": "window_index",
            "vision_layout": "window_index"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
