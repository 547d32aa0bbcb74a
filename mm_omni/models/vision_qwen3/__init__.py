"""Qwen3-VL-style vision encoder (Qwen3-Omni's ``visual``) on megatron-core: learned + rotary positions, full
attention per frame, a final merger and the deepstack mergers of intermediate layers.

The names below are imported on first use: a converter reads this stack's ``hf_mapping`` table without
importing megatron.
"""

from importlib import import_module

_EXPORTS = {"Qwen3VisionEncoder": "encoder", "Qwen3VisionTransformer": "encoder",
            "Qwen3VisionEncoderConfig": "config", "qwen3_vision_layout": "layout"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
