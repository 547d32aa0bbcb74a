"""LoRA on the tiny omni model: model.json's freeze still holds, targets are checked with clear errors."""

from __future__ import annotations

import argparse

import pytest

from tests.conftest import tiny_thinker_config
from tests.helpers import init_megatron


def _model(freeze_vision: bool):
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config
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


def test_checkpoint_size_formula_counts_what_the_model_holds():
    """mm_omni.lora.sizes (the 7B numbers in the README) on the tiny model: its LoRA count is the
    adapters' count exactly, its base count transformers' thinker (ours adds the fused QKV bias's
    key slice, zero, per audio layer)."""
    from mm_omni.lora import sizes
    from mm_omni.lora.inject import add_lora_from_args

    cfg = tiny_thinker_config()
    model = _model(freeze_vision=False)
    base = sum(p.numel() for p in model.parameters())
    assert base == sizes.thinker_params(cfg) + cfg.audio_config.encoder_layers * cfg.audio_config.d_model
    add_lora_from_args([model], _args(*(f"text_decoder.{t}" for t in sizes.TEXT_LINEARS)))
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert lora == sizes.text_lora_params(cfg.text_config, r=2) > 0
    seven_b = sizes.checkpoint_bytes(sizes.qwen2_5_omni_7b_thinker(), r=8)
    assert seven_b["lora_params"] == 28 * 8 * ((3584 + 4608) + (3584 + 3584) + (3584 + 2 * 18944) + (18944 + 3584))
