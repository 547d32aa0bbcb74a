"""Qwen2.5-Omni's registry entry (read by :mod:`mm_omni.registry`; imports nothing heavy)."""

from mm_omni.registry import ModelFamily

FAMILY = ModelFamily(
    name="qwen2_5_omni",
    title="Qwen2.5-Omni thinker (3B, 7B)",
    # MindSpeed-MM's examples/qwen2.5omni/model_*.json: top-level "qwen2_5vl", decoder "qwen2_5_omni_thinker"
    model_ids=(("qwen2_5vl", "qwen2_5_omni_thinker"), ("qwen2_5_omni", "qwen2_5_omni_thinker")),
    hf_model_types=("qwen2_5_omni", "qwen2_5_omni_thinker"),
    templates=("qwen2_omni",),
    converter="Qwen2_5_OmniConverter",
    modalities=("image", "video", "audio"),
    model_config_ref="mm_omni.config.model:OmniModelConfig",
    config_from_hf_ref="mm_omni.models.qwen2_5_omni.hf_config:config_from_hf",
    task_ref="mm_omni.training.omni_task:omni_task",
    template_ref="mm_omni.models.qwen2_5_omni.template:TEMPLATE",
    converter_ref="mm_omni.models.qwen2_5_omni.converter:Qwen2_5_OmniConverter",
    flops_ref="mm_omni.models.omni_flops:omni_batch_flops",
    features={
        "parity with transformers": "vision, audio, text stacks and the whole thinker, fp32 outputs and gradients "
                                    "(CPU tests); first-step loss through converter + data pipeline",
        "parallel": "TP, SP, CP, PP, VPP, DP, distributed optimizer, hetero per-module TP/DP: torchrun on CPU/gloo "
                    "tests; one-GPU runs on an H200 (multi-GPU not run)",
        "fine-tuning": "full, frozen modules, LoRA (adapter-only checkpoints, PEFT export)",
        "converter": "hf_to_mm / mm_to_hf / resplit, bit-exact round trip, TP/PP/VPP/per-module TP",
        "NPU": "code path present (torch_npu + mindspeed), untested",
    },
)
