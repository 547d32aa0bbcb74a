"""Qwen3-Omni's converter spec (:class:`mm_omni.checkpoint.spec.ConverterSpec`): the thinker is converted,
the talker (with its code predictor) and code2wav stay in the Hugging Face files. The experts of every MoE
layer split over ``--cfg.parallel_config.ep_size`` ranks."""

from __future__ import annotations

from mm_omni.checkpoint.spec import ConverterSpec, Precision
from mm_omni.models.qwen3_omni_moe import hf_mapping, precision
from mm_omni.models.qwen3_omni_moe.family import FAMILY
from mm_omni.models.qwen3_omni_moe.hf_config import from_hf_thinker_config, thinker_of
from mm_omni.models.qwen3_omni_moe.hf_fields import check_thinker_config

SPEC = ConverterSpec(
    converter=FAMILY.converter,
    title="Qwen3-Omni",
    hf_model_types=FAMILY.hf_model_types,
    sub_config=thinker_of,
    names=hf_mapping.NAMES,
    modules=hf_mapping.MODULES,
    decoder="text",
    table=hf_mapping.table,
    hf_model="transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe:Qwen3OmniMoeThinkerForConditionalGeneration",
    config_from_hf=from_hf_thinker_config,
    check_config=check_thinker_config,
    derived=hf_mapping.DERIVED,
    tie=hf_mapping.TIE,
    checkpoint_state=hf_mapping.checkpoint_state,
    fused_parameter=hf_mapping.fused_parameter,
    precision=Precision(model=precision.build_model, compare=precision.compare),
)
