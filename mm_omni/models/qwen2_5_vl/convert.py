"""Qwen2.5-VL's converter spec (:class:`mm_omni.checkpoint.spec.ConverterSpec`).

The stack tables of the shared decoder and ViT (the ViT's attention input is one fused ``attn.qkv``
``[q; k; v]`` here), the two spellings of the HF names (``model.language_model.*`` / ``model.visual.*`` of
transformers >= 5's ``state_dict()`` and ``save_pretrained``, ``model.*`` / ``visual.*`` of the Hub's older
files; ``lm_head`` in both, absent when tied, e.g. the 3B), the layout options (``llm_pp_layers``,
``vit_pp_layers``, ``tp_size`` / ``vit_tp_size``; no audio) and the precision probe.
"""

from __future__ import annotations

from mm_omni.checkpoint.mapping import HfNames
from mm_omni.checkpoint.spec import ConverterSpec, Precision
from mm_omni.models.qwen2_5_vl import precision
from mm_omni.models.qwen2_5_vl.family import FAMILY
from mm_omni.models.qwen2_5_vl.hf_config import config_from_hf
from mm_omni.models.qwen2_5_vl.hf_fields import check_vl_config
from mm_omni.models.text import hf_mapping as text_map
from mm_omni.models.vision import hf_mapping as vision_map

TEXT_HF, VISION_HF = "model.", "visual."  # where the stacks sit in the canonical (Hub) spelling


def _text(cfg):
    return cfg.text_config


def _vision(cfg):
    return cfg.vision_config


def _tied(cfg) -> bool:
    # transformers ties lm_head by the top-level flag (Qwen2_5_VLConfig forwards a pre-v5 text_config flag to it)
    return bool(cfg.tie_word_embeddings)


def table(cfg):
    return (text_map.table(_tied(cfg), hf=TEXT_HF, lm_head="lm_head.weight")
            + vision_map.table(hf=VISION_HF, qkv="fused"))


SPEC = ConverterSpec(
    converter=FAMILY.converter,
    title="Qwen2.5-VL",
    hf_model_types=FAMILY.hf_model_types,
    names=HfNames(spellings=(("model.language_model.", TEXT_HF), ("model.visual.", VISION_HF))),
    modules=(vision_map.module_spec(_vision), text_map.module_spec(_text)),
    decoder="text",
    table=table,
    hf_model="transformers:Qwen2_5_VLForConditionalGeneration",
    config_from_hf=config_from_hf,
    check_config=check_vl_config,
    derived=text_map.derived(TEXT_HF) + vision_map.derived(VISION_HF),
    tie=text_map.tie(_tied),
    precision=Precision(model=precision.build_model, compare=precision.compare),
)
