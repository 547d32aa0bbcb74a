"""``mm-convert Qwen2_5_OmniConverter hf_to_mm | mm_to_hf | resplit``: the generic converter
(:mod:`converters.common.converter`) over Qwen2.5-Omni's spec."""

from converters.common.converter import converter_class
from mm_omni.models.qwen2_5_omni.convert import SPEC

Qwen2_5_OmniConverter = converter_class(SPEC, "Qwen2.5-Omni thinker: Hugging Face <-> Megatron (MindSpeed-MM layout). "
                                              "talker/token2wav stay in HF.")
