"""The encoder blocks of a model.json: MindSpeed-MM's top-level ``<name>_encoder`` keys.

Each block carries its parallel sizes (``tp``, ``pp``, ``cp``) and the configs of its stacks, of which
the ``<name>_encoder`` ones hold the layers (``image_encoder.vision_encoder``,
``audio_encoder.audio_encoder``; a projector rides along). Code that treats every encoder alike (the
hetero layout, the pipeline layout checks) lists them here, by their model.json key, which is also the
model's attribute name.
"""

from __future__ import annotations

from typing import Any


def encoder_blocks(model_cfg) -> dict[str, Any]:
    """The encoder blocks model.json sets, by key, in the schema's order."""
    return {name: getattr(model_cfg, name) for name in type(model_cfg).model_fields
            if name.endswith("_encoder") and getattr(model_cfg, name) is not None}


def encoder_stacks(model_cfg) -> dict[str, Any]:
    """The layer stacks of those blocks, by dotted key (``"<block>.<stack>"``)."""
    return {f"{name}.{field}": getattr(block, field) for name, block in encoder_blocks(model_cfg).items()
            for field in type(block).model_fields if field.endswith("_encoder") and getattr(block, field) is not None}
