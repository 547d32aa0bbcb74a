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
    task_ref="mm_omni.training.omni_task:omni_task",
    template_ref="mm_omni.models.qwen3_omni_moe.template:TEMPLATE",
    converter_ref="mm_omni.models.qwen3_omni_moe.converter:Qwen3_OmniConverter",
    flops_ref="mm_omni.models.qwen3_omni_moe.flops:qwen3_omni_batch_flops",
    model_ref="mm_omni.models.qwen3_omni_moe.model:Qwen3OmniModel",
    features={
        "parity with transformers": "vision (deepstack), audio (AuT), MoE text stacks and the whole thinker: logits and "
                                    "every gradient incl. the load-balancing loss, padded and packed rows (CPU tests); "
                                    "float M-RoPE positions incl. audio in video",
        "parallel": "EP2 training = 1 process (losses, grad norms, load-balancing loss; resume), PP2 with the deepstack "
                    "additions crossing stages and TP2+SP = 1 process, PP2 x EP2 demo: torchrun on CPU/gloo; CP, VPP "
                    "and hetero not run for this family",
        "fine-tuning": "full, frozen encoders; LoRA on attention (not on experts)",
        "converter": "hf_to_mm / mm_to_hf / resplit, bit-exact round trip incl. EP layouts; talker, code predictor "
                     "and code2wav kept; the export loads as Qwen3OmniMoeForConditionalGeneration",
        "NPU": "code path present (torch_npu + mindspeed), untested",
    },
)
