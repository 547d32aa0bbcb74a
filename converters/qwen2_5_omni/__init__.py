"""Qwen2.5-Omni: key map, layout rules and the ``Qwen2_5_OmniConverter`` commands."""
