"""Qwen2 text decoder with M-RoPE (embedding, megatron-core blocks, output layer, vocab-parallel loss).

The names below are imported on first use: the converter reads this stack's ``hf_mapping`` table without
importing megatron.
"""

from importlib import import_module

_EXPORTS = {"DecoderOutput": "decoder", "TextDecoder": "decoder", "text_transformer_config": "decoder",
            "IGNORE_INDEX": "loss", "shift_labels": "loss"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
