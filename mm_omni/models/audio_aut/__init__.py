"""Qwen3-Omni's AuT audio encoder on megatron-core: a 2D-conv front end per mel chunk, windowed attention
blocks, ``ln_post -> proj1 -> act -> proj2``.

The names below are imported on first use: a converter reads this stack's ``hf_mapping`` table without
importing megatron.
"""

from importlib import import_module

_EXPORTS = {"AuTEncoder": "encoder", "AuTEncoderConfig": "config", "aut_layout": "layout",
            "aut_output_lengths": "layout"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
