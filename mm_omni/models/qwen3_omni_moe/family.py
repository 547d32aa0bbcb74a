"""Qwen3-Omni's registry entry (read by :mod:`mm_omni.registry`; imports nothing heavy).

The thinker of Qwen3-Omni-30B-A3B: the Qwen3-VL-style vision encoder with deepstack, the AuT audio encoder
and the Qwen3-MoE text decoder (128 experts, top-8) on megatron-core's MoE layer. The talker, code
predictor and code2wav are not trained; the converter keeps them and puts them back on export.
"""

from mm_omni.registry import ModelFamily

FAMILY = ModelFamily(
    name="qwen3_omni_moe",
    title="Qwen3-Omni thinker (30B-A3B, MoE)",
    model_ids=(("qwen3_omni_moe", "qwen3_omni_moe_thinker"),),
    hf_model_types=("qwen3_omni_moe", "qwen3_omni_moe_thinker"),
    templates=("qwen3_omni",),
    converter="Qwen3_OmniConverter",
    modalities=("image", "video", "audio"),
    model_config_ref="mm_omni.models.qwen3_omni_moe.config:Qwen3OmniModelConfig",
    config_from_hf_ref="mm_omni.models.qwen3_omni_moe.hf_config:config_from_hf",
    task_ref="mm_omni.models.qwen3_omni_moe.task:qwen3_omni_task",
    template_ref="mm_omni.models.qwen3_omni_moe.template:TEMPLATE",
    converter_ref="mm_omni.models.qwen3_omni_moe.converter:Qwen3_OmniConverter",
    flops_ref="mm_omni.models.qwen3_omni_moe.flops:qwen3_omni_batch_flops",
    model_ref="mm_omni.models.qwen3_omni_moe.model:Qwen3OmniModel",
    features={
        "parity with transformers": "vision (deepstack), audio (AuT), MoE text stacks and the whole thinker, fp32 "
                                    "outputs and gradients (CPU tests)",
        "parallel": "EP, TP+SP, PP (deepstack additions cross stages): torchrun on CPU/gloo",
        "fine-tuning": "full, frozen modules",
        "converter": "hf_to_mm / mm_to_hf / resplit; talker, code predictor and code2wav kept",
        "NPU": "code path present (torch_npu + mindspeed), untested",
    },
)
