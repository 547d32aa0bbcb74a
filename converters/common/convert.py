"""In-memory conversion of whole or partial state dicts, TP1/PP1, through a family's table.

For parity tests and tools that hold a transformers model and one of ours in the same process::

    from converters.common.convert import hf_state_to_mm, mm_state_to_hf
    from mm_omni.models.qwen2_5_omni.convert import SPEC

    mm = hf_state_to_mm(SPEC, hf_model.config, hf_model.state_dict())   # -> our model's names
    ours.load_state_dict(mm, strict=False)
    hf = mm_state_to_hf(SPEC, hf_model.config, ours.state_dict())       # -> transformers' module names

``hf_config`` is the full transformers config or the converted model's own (the spec's ``sub_config``
takes either). HF keys may use either spelling and carry the model prefix or not; other models' keys
(``spec.names.other_models``), config-derived buffers and a tied alias are skipped. A partial state dict
(one module, or gradients) converts: every tensor whose parts are all present is converted, a fused one
with only some of its parts raises, and so does any tensor the table does not know.
"""

from __future__ import annotations

from typing import Mapping

from torch import Tensor

from converters.common.plan import Plan
from mm_omni.checkpoint.mapping import Style
from mm_omni.checkpoint.spec import ConverterSpec


def plan_for(spec: ConverterSpec, hf_config) -> Plan:
    return Plan(spec, spec.sub_config(hf_config))


def hf_state_to_mm(spec: ConverterSpec, hf_config, hf_state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF tensors -> our (Megatron) names, TP1/PP1, global layer numbers."""
    return plan_for(spec, hf_config).hf_to_mm(hf_state_dict)


def mm_state_to_hf(spec: ConverterSpec, hf_config, mm_state_dict: Mapping[str, Tensor], style: Style = "module",
                   prefix: str = "") -> dict[str, Tensor]:
    """Inverse of :func:`hf_state_to_mm`. ``style`` / ``prefix`` pick the output spelling (default: the
    ``state_dict()`` of the bare transformers model: "module" spelling, no prefix). ``._extra_state`` entries
    and a tied model's output-layer copy are dropped."""
    return plan_for(spec, hf_config).mm_to_hf(mm_state_dict, style, prefix)


def expected_mm_keys(spec: ConverterSpec, hf_config) -> list[str]:
    """Every Megatron tensor name a complete model has (TP1/PP1, global numbering), in checkpoint order."""
    return [r.mm for r in plan_for(spec, hf_config).rules]
