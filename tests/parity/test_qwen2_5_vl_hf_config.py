"""Qwen2.5-VL config fields that change the math: honoured exactly, or refused by name.

Honoured values other than the tiny model's defaults go through the whole model against transformers (same
weights through the converter's table, fp32, logits, loss and every parameter gradient, rel err < 1e-5): other
activations in the vision and text MLPs, the embedding's ``pad_token_id`` (transformers' ``padding_idx``), other
rope thetas and M-RoPE sections. (Every activation name is swept per stack in test_hf_config_fields.py: the stacks
are Qwen2.5-Omni's.) Unsupported values are refused by ``config_from_hf`` naming the field, its value and "not
supported". docs/hf_config_audit_qwen2_5_vl.md must list every field transformers declares, so a field added by a
newer transformers fails here until it is audited.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from mm_omni.models.common.hf_activations import HF_ACTIVATIONS
from tests.fixtures.qwen2_5_vl import tiny_vl_config
from tests.parity import test_qwen2_5_vl as vl

TOL = 1e-5
PAD = 7
AUDIT = Path(__file__).resolve().parents[2] / "docs" / "hf_config_audit_qwen2_5_vl.md"


def model_json(cfg):
    from mm_omni.models.qwen2_5_vl.hf_config import config_from_hf

    return config_from_hf(cfg)


HONOURED = [
    pytest.param(dict(vision={"hidden_act": "quick_gelu"}, text={"hidden_act": "gelu_pytorch_tanh"}),
                 lambda m: (m.image_encoder.vision_encoder.activation_func, m.text_decoder.activation_func)
                 == ("quick_gelu", "gelu_tanh"), id="activations"),
    pytest.param(dict(text={"pad_token_id": PAD}, plant=PAD), lambda m: m.text_decoder.pad_token_id == PAD,
                 id="pad_token_id"),
    pytest.param(dict(text={"rope_parameters": {"rope_type": "default", "rope_theta": 5000.0,
                                                "mrope_section": [4, 2, 2]}},
                      vision={"rope_parameters": {"rope_type": "axial", "rope_theta": 300.0}}),
                 lambda m: (m.text_decoder.rope_theta, m.text_decoder.mrope_section,
                            m.image_encoder.vision_encoder.rope_theta) == (5000.0, [4, 2, 2], 300.0), id="rope"),
]


@pytest.mark.parametrize("overrides,carried", HONOURED)
def test_honoured_values_match_transformers(overrides, carried):
    cfg, mm_cfg, _, batch, _, (hf_logits, hf_loss, hf_grads), (logits, loss, grads) = vl.parity_run(False, **overrides)
    assert carried(mm_cfg)
    valid = batch["attention_mask"].bool()
    errors = {"logits": vl.rel_err(logits[valid], hf_logits[valid]), "loss": vl.rel_err(loss, hf_loss)}
    expected = vl.hf_to_mm(hf_grads, cfg)
    assert set(expected) == set(grads)
    errors.update({k: float((grads[k] - g).abs().max() / g.abs().max().clamp_min(1e-30)) for k, g in expected.items()})
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOL, (worst, errors[worst])


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_pad_token_row_gets_transformers_gradient(tied):
    """transformers' Embedding(padding_idx=pad_token_id): no gradient from that id's lookups (the id occurs in
    every row); a tied output layer still gives the row its share."""
    cfg, _, _, batch, _, (_, _, hf_grads), (_, _, grads) = vl.parity_run(tied, plant=PAD, text={"pad_token_id": PAD})
    assert all((row == PAD).any() for row in batch["input_ids"])
    expected = vl.hf_to_mm(hf_grads, cfg)
    name = "text_decoder.embedding.word_embeddings.weight"
    assert vl.rel_err(grads[name], expected[name]) < TOL
    row = grads[name][PAD]
    assert (row.abs().max() > 0) if tied else torch.equal(row, torch.zeros_like(row))


def test_negative_pad_token_id_counts_from_the_end():
    assert model_json(tiny_vl_config(text={"pad_token_id": -1})).text_decoder.pad_token_id == 1023


def test_pre_v5_text_tie_flag_is_forwarded():
    """transformers moves a pre-v5 ``text_config.tie_word_embeddings: true`` to the top level, and so do we."""
    cfg = tiny_vl_config(text={"tie_word_embeddings": True})
    assert cfg.tie_word_embeddings and not model_json(cfg).text_decoder.untie_embeddings_and_output_weights


REFUSED = [
    pytest.param(dict(vision={"hidden_act": "relu"}), r"vision_config\.hidden_act='relu': not supported",
                 id="vision_hidden_act"),
    pytest.param(dict(text={"hidden_act": "gelu_10"}), r"text_config\.hidden_act='gelu_10': not supported",
                 id="text_hidden_act"),
    pytest.param(dict(text={"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
                 r"text_config\.use_sliding_window=True: not supported", id="use_sliding_window"),
    pytest.param(dict(text={"layer_types": ["full_attention", "sliding_attention", "full_attention"]}),
                 r"text_config\.layer_types=\[.*\]: not supported \(layers \[1\] are sliding_attention",
                 id="layer_types"),
    pytest.param(dict(text={"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6,
                                                "mrope_section": [2, 3, 3]}}),
                 r"text_config\.rope_parameters\['rope_type'\]='linear': not supported", id="rope_linear"),
    pytest.param(dict(text={"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e6,
                                                "mrope_section": [2, 3, 3]}}),
                 r"text_config\.rope_parameters\['rope_type'\]='yarn': not supported", id="rope_yarn"),
    pytest.param(dict(text={"head_dim": 8}), r"text_config\.head_dim=8: not supported", id="text_head_dim"),
    pytest.param(dict(vision={"head_dim": 8}), r"vision_config\.head_dim=8: not supported", id="vision_head_dim"),
    pytest.param(dict(vision={"patch_size": [14, 14]}), r"vision_config\.patch_size=\[14, 14\]: not supported",
                 id="patch_size_list"),
    pytest.param(dict(vision={"temporal_patch_size": [2, 2]}),
                 r"vision_config\.temporal_patch_size=\[2, 2\]: not supported", id="temporal_patch_size_list"),
    pytest.param(dict(text={"pad_token_id": 5000}), r"text_config\.pad_token_id=5000: not supported",
                 id="pad_token_id"),
]


@pytest.mark.parametrize("overrides,message", REFUSED)
def test_unsupported_values_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        model_json(tiny_vl_config(**overrides))


def test_vision_rope_type_is_refused_by_name():
    cfg = tiny_vl_config()
    cfg.vision_config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}  # transformers refuses it too
    with pytest.raises(ValueError, match=r"vision_config\.rope_parameters\['rope_type'\]='default': not supported"):
        model_json(cfg)


def test_every_problem_is_listed_at_once():
    cfg = tiny_vl_config(vision={"hidden_act": "relu"}, text={"use_sliding_window": True})
    with pytest.raises(ValueError, match=r"(?s)Qwen2\.5-VL config:.*vision_config\.hidden_act.*use_sliding_window"):
        model_json(cfg)


def test_activation_names_cover_the_vision_and_text_fields():
    for act in HF_ACTIVATIONS:
        m = model_json(tiny_vl_config(vision={"hidden_act": act}, text={"hidden_act": act}))
        assert m.image_encoder.vision_encoder.activation_func == m.text_decoder.activation_func == HF_ACTIVATIONS[act]


# --------------------------------------------------------------------------------------------
# the audit lists every field transformers declares
# --------------------------------------------------------------------------------------------
def audited_fields(section_title: str) -> set[str]:
    sections = re.split(r"^## ", AUDIT.read_text(), flags=re.M)
    matching = [s for s in sections if s.splitlines()[0].find(section_title) >= 0]
    assert len(matching) == 1, f"{AUDIT.name}: one section titled with {section_title} expected"
    return set(re.findall(r"^\|\s*`([^`]+)`", matching[0], flags=re.M))


def test_audit_lists_every_declared_field():
    from transformers import PreTrainedConfig
    from transformers.models.qwen2_5_vl import configuration_qwen2_5_vl as hf

    base = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    assert base <= audited_fields("PreTrainedConfig"), base - audited_fields("PreTrainedConfig")
    for cls in (hf.Qwen2_5_VLConfig, hf.Qwen2_5_VLTextConfig, hf.Qwen2_5_VLVisionConfig):
        own = {f.name for f in dataclasses.fields(cls)} - base
        missing = own - audited_fields(f"`{cls.__name__}`")
        assert not missing, f"{cls.__name__} fields not in {AUDIT.name}: {sorted(missing)} (audit them)"
