"""``mm-convert Qwen2_5_VLConverter hf_to_mm | mm_to_hf | resplit``: the generic converter over Qwen2.5-VL's spec."""

from converters.common.converter import converter_class
from mm_omni.models.qwen2_5_vl.convert import SPEC

Qwen2_5_VLConverter = converter_class(SPEC, "Qwen2.5-VL: Hugging Face <-> Megatron (MindSpeed-MM layout).")
