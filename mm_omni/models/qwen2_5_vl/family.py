"""Qwen2.5-VL's registry entry (read by :mod:`mm_omni.registry`; imports nothing heavy).

The model is the Qwen2.5-Omni thinker without its audio encoder: the same vision stack
(:mod:`mm_omni.models.vision`) and decoder (:mod:`mm_omni.models.text`) in :class:`mm_omni.models.omni.OmniModel`
with ``audio_encoder`` absent from model.json, so the generic omni task and FLOP count serve it.
"""

from mm_omni.registry import ModelFamily

FAMILY = ModelFamily(
    name="qwen2_5_vl",
    title="Qwen2.5-VL (3B, 7B, 32B, 72B)",
    # MindSpeed-MM's examples/qwen2.5vl/model_*.json: top-level "qwen2_5vl" (shared with Qwen2.5-Omni), decoder "qwen2_5_lm"
    model_ids=(("qwen2_5vl", "qwen2_5_lm"),),
    hf_model_types=("qwen2_5_vl",),
    templates=("qwen2vl",),
    converter="Qwen2_5_VLConverter",
    modalities=("image", "video"),
    model_config_ref="mm_omni.config.model:OmniModelConfig",
    config_from_hf_ref="mm_omni.models.qwen2_5_vl.hf_config:config_from_hf",
    task_ref="mm_omni.training.omni_task:omni_task",
    template_ref="mm_omni.models.qwen2_5_vl.template:TEMPLATE",
    converter_ref="mm_omni.models.qwen2_5_vl.converter:Qwen2_5_VLConverter",
    flops_ref="mm_omni.models.omni_flops:omni_batch_flops",
    features={
        "parity with transformers": "whole model (image, video, text-only rows; untied and tied output layer), fp32 "
                                    "logits and every parameter gradient against Qwen2_5_VLForConditionalGeneration "
                                    "(CPU tests); M-RoPE positions through the data pipeline; first-step loss of "
                                    "MindSpeed-MM's model_3b.json / data_7b.json (shrunk) through converter + data "
                                    "pipeline at PP2",
        "parallel": "TP2 and PP2 torchrun on CPU/gloo follow one process (losses, gradient norms); the omni task's "
                    "SP, CP, VPP, DP and hetero layouts are shared with Qwen2.5-Omni and not run for this family",
        "fine-tuning": "full; frozen vision encoder / projector as MindSpeed-MM's model_*.json ship them (run in the "
                       "first-step test); LoRA not run for this family",
        "converter": "hf_to_mm / mm_to_hf / resplit, bit-exact round trip (both HF spellings, TP2/PP2, per-module "
                     "TP, tied), export loads in transformers with our logits, --cfg.test_convert_precision",
        "NPU": "code path present (torch_npu + mindspeed), untested",
    },
)
