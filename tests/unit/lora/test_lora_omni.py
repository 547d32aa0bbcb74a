"""LoRA on the tiny omni model: model.json's freeze still holds, targets are checked with clear errors."""

from __future__ import annotations

import argparse

import pytest

from tests.conftest import tiny_thinker_config
from tests.helpers import init_megatron


def _model(freeze_vision: bool):
    from mm_omni.config.model import from_hf_thinker_config
    from mm_omni.models.omni import OmniModel

    init_megatron()
    cfg = from_hf_thinker_config(tiny_thinker_config())
    cfg.image_encoder.vision_encoder.freeze = freeze_vision
    return OmniModel(cfg)


def _args(*targets):
    return argparse.Namespace(lora_target_modules=list(targets), lora_r=2, lora_alpha=4.0, lora_dropout=0.0, seed=1)


def test_model_json_freeze_keeps_its_modules_adapter_free():
    from mm_omni.lora.inject import add_lora_from_args

    model = _model(freeze_vision=True)
    add_lora_from_args([model], _args("linear_qkv", "linear_fc1"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert not any(n.startswith("image_encoder.encoder.") for n in trainable)  # frozen by model.json
    for prefix in ("image_encoder.projector.", "audio_encoder.", "text_decoder.decoder.layers.2.self_attention."):
        assert any(n.startswith(prefix) for n in trainable), prefix


@pytest.mark.parametrize("target,match", [("linear_qvk", "matches no linear layer"),
                                          ("input_layernorm", "are not linear layers"),
                                          ("image_encoder.encoder.linear_qkv", "model.json freezes")])
def test_bad_targets_fail_naming_them(target, match):
    from mm_omni.lora.inject import add_lora_from_args
    from mm_omni.lora.targets import LoraTargetError

    with pytest.raises(LoraTargetError, match=match):
        add_lora_from_args([_model(freeze_vision=True)], _args(target))
