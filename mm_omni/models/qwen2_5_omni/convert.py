"""Qwen2.5-Omni's converter spec (:class:`mm_omni.checkpoint.spec.ConverterSpec`): the thinker is converted,
talker / token2wav stay in the Hugging Face files."""

from __future__ import annotations

from mm_omni.checkpoint.spec import ConverterSpec, Precision
from mm_omni.models.qwen2_5_omni import hf_mapping, precision
from mm_omni.models.qwen2_5_omni.family import FAMILY
from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config, thinker_of
from mm_omni.models.qwen2_5_omni.hf_fields import check_thinker_config

SPEC = ConverterSpec(
    converter=FAMILY.converter,
    title="Qwen2.5-Omni",
    hf_model_types=FAMILY.hf_model_types,
    sub_config=thinker_of,
    names=hf_mapping.NAMES,
    modules=hf_mapping.MODULES,
    decoder="text",
    table=hf_mapping.table,
    hf_model="transformers.models.qwen2_5_omni.modeling_qwen2_5_omni:Qwen2_5OmniThinkerForConditionalGeneration",
    config_from_hf=from_hf_thinker_config,
    check_config=check_thinker_config,
    derived=hf_mapping.DERIVED,
    tie=hf_mapping.TIE,
    precision=Precision(model=precision.build_model, compare=precision.compare),
)
