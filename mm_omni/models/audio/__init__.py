"""Qwen2.5-Omni's Whisper-style audio encoder (conv front end, chunked attention, pooling, projector).

The names below are imported on first use: the converter reads this stack's ``hf_mapping`` table without
importing megatron.
"""

from importlib import import_module

_EXPORTS = {"AudioEncoder": "encoder", "audio_transformer_config": "encoder"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
