"""Qwen2.5-Omni's table: HF <-> MindSpeed-MM names on a tiny random thinker (both HF spellings)."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration

from converters.common.convert import expected_mm_keys, hf_state_to_mm, mm_state_to_hf
from mm_omni.models.qwen2_5_omni.convert import SPEC
from tests.conftest import tiny_thinker_config


def _random_thinker(cfg, seed=0):
    torch.manual_seed(seed)
    model = Qwen2_5OmniThinkerForConditionalGeneration(cfg)
    with torch.no_grad():  # transformers inits norms to 1 and biases to 0: make every tensor distinct
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def thinker():
    cfg = tiny_thinker_config()
    return cfg, _random_thinker(cfg)


def _same(a: dict, b: dict):
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_module_spelling_round_trip(thinker):
    cfg, model = thinker
    hf = model.state_dict()
    mm = hf_state_to_mm(SPEC, cfg, hf)
    assert sorted(mm) == sorted(expected_mm_keys(SPEC, cfg))
    _same(mm_state_to_hf(SPEC, cfg, mm), hf)
    _same(hf_state_to_mm(SPEC, cfg, mm_state_to_hf(SPEC, cfg, mm)), mm)
    fresh = Qwen2_5OmniThinkerForConditionalGeneration(cfg)
    fresh.load_state_dict(mm_state_to_hf(SPEC, cfg, mm), strict=True)


def test_hub_spelling_with_thinker_prefix(thinker):
    cfg, model = thinker
    names = SPEC.names
    hub = {names.from_canonical(names.to_canonical(k), "hub", "thinker."): v for k, v in model.state_dict().items()}
    assert "thinker.model.layers.0.self_attn.q_proj.weight" in hub and "thinker.visual.merger.ln_q.weight" in hub
    hub["talker.model.norm.weight"] = torch.ones(3)  # not the thinker's: ignored
    mm = hf_state_to_mm(SPEC, cfg, hub)
    assert SPEC.names.detect_style(hub) == ("thinker.", "hub")
    back = mm_state_to_hf(SPEC, cfg, mm, style="hub", prefix="thinker.")
    hub.pop("talker.model.norm.weight")
    _same(back, hub)


def test_names_and_interleaving(thinker):
    cfg, model = thinker
    hf = model.state_dict()
    mm = hf_state_to_mm(SPEC, cfg, hf)
    text = cfg.text_config
    groups, hd = text.num_key_value_heads, text.hidden_size // text.num_attention_heads
    per_q = text.num_attention_heads // groups * hd
    qkv = mm["text_decoder.decoder.layers.1.self_attention.linear_qkv.weight"]
    q = hf["model.language_model.layers.1.self_attn.q_proj.weight"]
    k = hf["model.language_model.layers.1.self_attn.k_proj.weight"]
    v = hf["model.language_model.layers.1.self_attn.v_proj.weight"]
    step = per_q + 2 * hd
    assert torch.equal(qkv[step: step + per_q], q[per_q: 2 * per_q])  # group 1 starts with its q heads
    assert torch.equal(qkv[step + per_q: step + per_q + hd], k[hd: 2 * hd])
    assert torch.equal(qkv[step + per_q + hd: 2 * step], v[hd: 2 * hd])
    fc1 = mm["image_encoder.encoder.blocks.layers.0.mlp.linear_fc1.bias"]
    gate, up = hf["model.visual.blocks.0.mlp.gate_proj.bias"], hf["model.visual.blocks.0.mlp.up_proj.bias"]
    assert torch.equal(fc1, torch.cat([gate, up]))
    heads, d = cfg.audio_config.encoder_attention_heads, cfg.audio_config.d_model
    bias = mm["audio_encoder.encoder.blocks.layers.2.self_attention.linear_qkv.bias"].reshape(heads, 3, d // heads)
    assert not bias[:, 1].any()  # inserted zero key bias
    assert torch.equal(bias[:, 0].reshape(-1), hf["model.audio_tower.layers.2.self_attn.q_proj.bias"])
    for name in ("text_decoder.output_layer.weight", "image_encoder.projector.encoder.linear_fc2.bias",
                 "audio_encoder.encoder.audio_bos_eos_token.weight", "audio_encoder.encoder.ln_post.bias"):
        assert name in mm


def test_partial_state_dicts_convert(thinker):
    cfg, model = thinker
    vis = {k: v for k, v in model.state_dict().items() if k.startswith("model.visual.")}
    mm = hf_state_to_mm(SPEC, cfg, vis)
    assert mm and all(k.startswith("image_encoder.") for k in mm)


def test_errors(thinker):
    cfg, model = thinker
    hf = dict(model.state_dict())
    with pytest.raises(KeyError, match="no MindSpeed-MM name"):
        hf_state_to_mm(SPEC, cfg, {**hf, "model.visual.blocks.9.norm1.weight": torch.ones(2)})
    partial = dict(hf)
    partial.pop("model.language_model.layers.0.self_attn.k_proj.weight")
    with pytest.raises(KeyError, match="k_proj.weight"):
        hf_state_to_mm(SPEC, cfg, partial)
    with pytest.raises(KeyError, match="no HF name"):
        mm_state_to_hf(SPEC, cfg, {"text_decoder.decoder.layers.99.input_layernorm.weight": torch.ones(2)})


def test_derived_buffers_and_extra_state_are_accounted(thinker):
    cfg, model = thinker
    hf = {**model.state_dict(), "model.audio_tower.positional_embedding.positional_embedding": torch.zeros(4, 2),
          "model.visual.rotary_pos_emb.inv_freq": torch.zeros(2)}
    mm = hf_state_to_mm(SPEC, cfg, hf)
    assert not any("positional_embedding" in k or "inv_freq" in k for k in mm)
    extra = "text_decoder.decoder.layers.0.self_attention.core_attention._extra_state"
    back = mm_state_to_hf(SPEC, cfg, {**mm, extra: None})
    assert len(back) == len(model.state_dict())


def test_tied_embeddings():
    cfg = tiny_thinker_config(tie_word_embeddings=True)
    model = _random_thinker(cfg)
    hf = model.state_dict()
    assert "lm_head.weight" in hf  # state_dict() lists the tied alias
    mm = hf_state_to_mm(SPEC, cfg, hf)
    assert "text_decoder.output_layer.weight" not in mm
    mm["text_decoder.output_layer.weight"] = mm["text_decoder.embedding.word_embeddings.weight"]  # PP>1 tie copy
    back = mm_state_to_hf(SPEC, cfg, mm)
    assert "lm_head.weight" not in back  # save_pretrained drops the alias too
    Qwen2_5OmniThinkerForConditionalGeneration(cfg).load_state_dict(back, strict=False)


def test_nonzero_audio_key_bias_is_dropped(thinker, caplog):
    cfg, model = thinker
    mm = hf_state_to_mm(SPEC, cfg, model.state_dict())
    name = "audio_encoder.encoder.blocks.layers.0.self_attention.linear_qkv.bias"
    mm[name] = mm[name] + 1.0
    with caplog.at_level(logging.INFO):
        back = mm_state_to_hf(SPEC, cfg, mm)
    assert "nonzero key bias" in caplog.text
    assert "model.audio_tower.layers.0.self_attn.k_proj.bias" not in back
