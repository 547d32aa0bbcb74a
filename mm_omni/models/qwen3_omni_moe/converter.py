"""``mm-convert Qwen3_OmniConverter hf_to_mm | mm_to_hf | resplit``: the generic converter
(:mod:`converters.common.converter`) over Qwen3-Omni's spec."""

from converters.common.converter import converter_class
from mm_omni.models.qwen3_omni_moe.convert import SPEC

Qwen3_OmniConverter = converter_class(SPEC, "Qwen3-Omni thinker (MoE): Hugging Face <-> Megatron (MindSpeed-MM "
                                            "layout, experts split by ep_size). talker/code2wav stay in HF.")
