"""HF thinker config fields that change the math: honoured exactly, or refused by name.

Honoured fields are swept with tiny models against transformers (same weights through the converter's
keymap, fp32, forward and every parameter gradient, rel err < 1e-5): each supported activation name in
the vision MLP (gated), the text MLP (gated) and the audio MLP; the text embedding's ``pad_token_id``
(transformers' ``padding_idx``), untied and tied; the text ``attention_dropout`` in training. Unsupported
values are refused by ``from_hf_thinker_config`` and by ``hf_to_mm`` (before any tensor is read), naming
the field, its value and "not supported". docs/hf_config_audit.md must list every field transformers
declares, so a field added by a newer transformers fails here until it is audited.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from mm_omni.models.common.hf_activations import HF_ACTIVATIONS
from tests.conftest import tiny_thinker_config
from tests.helpers import init_megatron, randomize_
from tests.parity import test_text as text_parity
from tests.parity import test_vision as vision_parity

TOL = 1e-5
AUDIT = Path(__file__).resolve().parents[2] / "docs" / "hf_config_audit.md"
ACTIVATIONS = sorted(HF_ACTIVATIONS)


def err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference relative to the reference's largest magnitude; 0 when both are exactly zero."""
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def worst(errors: dict) -> tuple[str, float]:
    name = max(errors, key=errors.get)
    return name, errors[name]


def model_json(cfg):
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config

    return from_hf_thinker_config(cfg)


# --------------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_vision_activation_matches_transformers(act):
    init_megatron()
    cfg = tiny_thinker_config(vision={"hidden_act": act})
    assert model_json(cfg).image_encoder.vision_encoder.activation_func == HF_ACTIVATIONS[act]
    hf = vision_parity.build_hf_visual(cfg)
    model = vision_parity.build_mm_visual(cfg)
    vision_parity.load_mm(model, vision_parity.hf_visual_to_mm(hf.state_dict(), cfg))
    pixels, grid, probe = vision_parity.make_inputs(cfg, grid_thw=[[1, 4, 6], [2, 4, 4]])
    hf_out, hf_grads = vision_parity.run_hf(hf, pixels, grid, probe)
    mm_out, mm_grads = vision_parity.run_mm(model, pixels, grid, probe)
    expected = vision_parity.hf_visual_to_mm(hf_grads, cfg)
    errors = {"output": err(mm_out, hf_out)}
    errors.update({k: err(mm_grads[k[len("image_encoder."):]], g) for k, g in expected.items()})
    assert len(errors) > 20
    assert worst(errors)[1] < TOL, worst(errors)


def run_text(cfg, train: bool = False, rows=None):
    """transformers' and our text decoder on the same right-padded rows: (hf, mm) = (logits, loss, grads)."""
    text, lm_head = text_parity.build_hf_text(cfg)
    model = text_parity.build_mm_text(cfg)
    tied = cfg.tie_word_embeddings
    text_parity.load_mm(model, text_parity.hf_to_mm(text_parity.hf_text_state(text, lm_head, tied), cfg),
                        "text_decoder.")
    text.train(train)
    model.train(train)
    ids, labels, mask, pos = text_parity.pad_rows(rows or text_parity.make_rows(cfg.text_config.vocab_size))
    hf = text_parity.run_hf(text, lm_head, ids, mask, pos, labels)
    mm = text_parity.run_mm(model, input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
    return hf, mm, mask.bool()


def text_errors(cfg, hf, mm, valid) -> dict:
    """Logits (real tokens), loss and every gradient, mapped to our names with the keymap."""
    hf_grads = {(k if k.startswith("lm_head") else f"model.{k}"): g for k, g in hf[2].items()}
    expected = text_parity.hf_to_mm(hf_grads, cfg)
    assert set(expected) == set(mm[2]), set(expected) ^ set(mm[2])
    errors = {"logits": err(mm[0][valid], hf[0][valid]), "loss": err(mm[1], hf[1])}
    errors.update({k: err(mm[2][k], g) for k, g in expected.items()})
    return errors


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_text_activation_matches_transformers(act):
    init_megatron()
    cfg = tiny_thinker_config(text={"hidden_act": act})
    assert model_json(cfg).text_decoder.activation_func == HF_ACTIVATIONS[act]
    hf, mm, valid = run_text(cfg)
    errors = text_errors(cfg, hf, mm, valid)
    assert worst(errors)[1] < TOL, worst(errors)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_audio_activation_matches_transformers(act):
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

    from converters.common.convert import hf_state_to_mm
    from mm_omni.models.qwen2_5_omni.convert import SPEC
    from mm_omni.models.audio import AudioEncoder

    init_megatron()
    cfg = tiny_thinker_config(audio={"activation_function": act})
    audio_cfg = model_json(cfg).audio_encoder.audio_encoder
    assert audio_cfg.activation_func == HF_ACTIVATIONS[act]
    torch.manual_seed(0)
    hf = Qwen2_5OmniAudioEncoder(cfg.audio_config).float()
    randomize_(hf, 1, scale=0.1)
    ours = AudioEncoder(audio_cfg)

    def to_mm(state):
        mm = hf_state_to_mm(SPEC, cfg, {f"model.audio_tower.{k}": v for k, v in state.items()})
        return {k: v for k, v in mm.items() if k.startswith("audio_encoder.")}

    state = {k[len("audio_encoder."):]: v for k, v in to_mm(hf.state_dict()).items()}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    lens = torch.tensor([37, 20])
    flat = torch.randn(cfg.audio_config.num_mel_bins, int(lens.sum()), generator=torch.Generator().manual_seed(2))
    after_cnn, _ = hf._get_feat_extract_output_lengths(lens)
    ref = hf(flat, feature_lens=lens, aftercnn_lens=after_cnn).last_hidden_state
    probe = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    (ref * probe).sum().backward()
    out = ours(flat, lens)
    (out * probe).sum().backward()
    expected = to_mm({k: p.grad for k, p in hf.named_parameters() if p.grad is not None})
    grads = {f"audio_encoder.{k}": p.grad for k, p in ours.named_parameters() if p.requires_grad}
    assert set(grads) == set(expected), set(grads) ^ set(expected)
    errors = {"output": err(out.detach(), ref.detach())}
    errors.update({k: err(grads[k], g) for k, g in expected.items()})
    assert worst(errors)[1] < TOL, worst(errors)


def test_activation_names_are_one_list():
    """model.json's literal, the functions the models use and the HF mapping name the same activations."""
    import typing

    from mm_omni.config.model import ActivationName
    from mm_omni.models.common.transformer_config import ACTIVATIONS as FUNCTIONS

    assert set(typing.get_args(ActivationName)) == set(FUNCTIONS) >= set(HF_ACTIVATIONS.values())


def test_only_the_gated_silu_is_fused(monkeypatch):
    """On CUDA megatron's fused bias-SwiGLU is used for the gated SiLU only (its fused GELU is tanh GELU)."""
    from mm_omni.models.common import transformer_config as tc

    monkeypatch.setattr(tc, "get_platform", lambda: type("P", (), {"name": "cuda"})())
    blocks = model_json(tiny_thinker_config())
    assert tc._fuse_swiglu(blocks.text_decoder)
    for act in ACTIVATIONS:
        cfg = model_json(tiny_thinker_config(text={"hidden_act": act}, audio={"activation_function": act}))
        assert tc._fuse_swiglu(cfg.text_decoder) is (HF_ACTIVATIONS[act] == "silu")
        assert not tc._fuse_swiglu(cfg.audio_encoder.audio_encoder)  # ungated
    assert not tc._fuse_swiglu(blocks.image_encoder.vision_projector)


# --------------------------------------------------------------------------------------------
# pad_token_id (padding_idx) and attention_dropout
# --------------------------------------------------------------------------------------------
PAD = 7


def rows_with_pad(vocab: int):
    """Rows whose real (labelled) tokens include PAD at several places: its lookups carry gradient otherwise."""
    rows = text_parity.make_rows(vocab)
    for ids, _, _ in rows:
        ids[1::3] = PAD
    return rows


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_pad_token_row_gets_transformers_gradient(tied):
    """transformers' Embedding(padding_idx=pad_token_id): no gradient from that id's lookups; a tied
    output layer still gives the row its share."""
    init_megatron()
    cfg = tiny_thinker_config(text={"pad_token_id": PAD, "tie_word_embeddings": tied}, tie_word_embeddings=tied)
    assert model_json(cfg).text_decoder.pad_token_id == PAD
    hf, mm, valid = run_text(cfg, rows=rows_with_pad(cfg.text_config.vocab_size))
    errors = text_errors(cfg, hf, mm, valid)
    assert worst(errors)[1] < TOL, worst(errors)
    row = mm[2]["text_decoder.embedding.word_embeddings.weight"][PAD]
    if tied:
        assert row.abs().max() > 0  # the output layer's gradient stays
    else:
        assert torch.equal(row, torch.zeros_like(row))


@pytest.mark.distributed
def test_pad_token_row_under_tensor_parallel():
    """TP=2 (the pad id's row on rank 1) gives TP=1's logits, loss and gradients."""
    from tests.distributed.torchrun import run_torchrun

    out = run_torchrun(Path(__file__).with_name("pad_token_tp_worker.py"), 2, timeout=300)
    assert "PAD_TP_OK" in out, out


def test_negative_pad_token_id_counts_from_the_end():
    assert model_json(tiny_thinker_config(text={"pad_token_id": -1})).text_decoder.pad_token_id == 1023


def test_attention_dropout_is_applied_in_training():
    """text_config.attention_dropout reaches our attention core; at p = 1 every attention output is zero in
    training (deterministic), in transformers and ours alike."""
    init_megatron()
    cfg = tiny_thinker_config(text={"attention_dropout": 1.0})
    assert model_json(cfg).text_decoder.attention_dropout == 1.0
    hf, mm, valid = run_text(cfg, train=True)
    errors = text_errors(cfg, hf, mm, valid)
    assert worst(errors)[1] < TOL, worst(errors)
    qkv = mm[2]["text_decoder.decoder.layers.0.self_attention.linear_qkv.weight"]
    assert torch.equal(qkv, torch.zeros_like(qkv))  # the attention did nothing


# --------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------
REFUSED = [
    pytest.param(dict(vision={"hidden_act": "relu"}), r"vision_config\.hidden_act='relu': not supported",
                 id="vision_hidden_act"),
    pytest.param(dict(text={"hidden_act": "gelu_10"}), r"text_config\.hidden_act='gelu_10': not supported",
                 id="text_hidden_act"),
    pytest.param(dict(audio={"activation_function": "tanh"}),
                 r"audio_config\.activation_function='tanh': not supported", id="audio_activation_function"),
    pytest.param(dict(text={"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
                 r"text_config\.use_sliding_window=True: not supported", id="use_sliding_window"),
    pytest.param(dict(text={"layer_types": ["full_attention", "sliding_attention", "full_attention"]}),
                 r"text_config\.layer_types=\[.*\]: not supported \(layers \[1\] are sliding_attention",
                 id="layer_types"),
    pytest.param(dict(text={"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6,
                                                "mrope_section": [2, 3, 3]}}),
                 r"text_config\.rope_parameters\['rope_type'\]='linear': not supported", id="rope_linear"),
    pytest.param(dict(text={"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6,
                                                "mrope_section": [2, 3, 3]}}),
                 r"text_config\.rope_parameters\['rope_type'\]='dynamic': not supported", id="rope_dynamic"),
    pytest.param(dict(text={"head_dim": 8}), r"text_config\.head_dim=8: not supported", id="text_head_dim"),
    pytest.param(dict(vision={"head_dim": 8}), r"vision_config\.head_dim=8: not supported", id="vision_head_dim"),
    pytest.param(dict(vision={"patch_size": [14, 14]}), r"vision_config\.patch_size=\[14, 14\]: not supported",
                 id="patch_size_list"),
    pytest.param(dict(audio={"dropout": 0.1}), r"audio_config\.dropout=0\.1: not supported", id="audio_dropout"),
    pytest.param(dict(audio={"attention_dropout": 0.1}), r"audio_config\.attention_dropout=0\.1: not supported",
                 id="audio_attention_dropout"),
    pytest.param(dict(audio={"activation_dropout": 0.1}), r"audio_config\.activation_dropout=0\.1: not supported",
                 id="audio_activation_dropout"),
    pytest.param(dict(audio={"scale_embedding": True}), r"audio_config\.scale_embedding=True: not supported",
                 id="scale_embedding"),
    pytest.param(dict(text={"pad_token_id": 5000}), r"text_config\.pad_token_id=5000: not supported",
                 id="pad_token_id"),
]


@pytest.mark.parametrize("overrides,message", REFUSED)
def test_unsupported_values_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        model_json(tiny_thinker_config(**overrides))


def test_every_problem_is_listed_at_once():
    cfg = tiny_thinker_config(vision={"hidden_act": "relu"}, text={"use_sliding_window": True})
    with pytest.raises(ValueError, match=r"(?s)vision_config\.hidden_act.*text_config\.use_sliding_window"):
        model_json(cfg)


def test_hf_to_mm_refuses_before_reading_tensors(tmp_path):
    """The converter stops at config.json: the one safetensors file here is not even a valid file."""
    from tests.unit.converters.helpers import hf_to_mm, layout

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    cfg = tiny_thinker_config(text={"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1})
    (hf_dir / "config.json").write_text(cfg.to_json_string())
    (hf_dir / "model.safetensors").write_bytes(b"not read")
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == "qwen2_5_omni_thinker"
    with pytest.raises(ValueError, match=r"text_config\.use_sliding_window=True: not supported"):
        hf_to_mm(hf_dir, tmp_path / "mm", layout([[3]], [[4]], [[3]]))
    assert not (tmp_path / "mm").exists()


# --------------------------------------------------------------------------------------------
# the audit lists every field transformers declares
# --------------------------------------------------------------------------------------------
def audited_fields(section_title: str) -> set[str]:
    """The first-column names (`` `name` ``) of the table under the docs' ``## ...section_title...`` heading."""
    sections = re.split(r"^## ", AUDIT.read_text(), flags=re.M)
    matching = [s for s in sections if s.splitlines()[0].find(section_title) >= 0]
    assert len(matching) == 1, f"{AUDIT.name}: one section titled with {section_title} expected"
    return set(re.findall(r"^\|\s*`([^`]+)`", matching[0], flags=re.M))


def test_audit_lists_every_declared_field():
    from transformers import PreTrainedConfig
    from transformers.models.qwen2_5_omni import configuration_qwen2_5_omni as hf

    base = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    assert base <= audited_fields("PreTrainedConfig"), base - audited_fields("PreTrainedConfig")
    for cls in (hf.Qwen2_5OmniThinkerConfig, hf.Qwen2_5OmniTextConfig, hf.Qwen2_5OmniVisionEncoderConfig,
                hf.Qwen2_5OmniAudioEncoderConfig):
        own = {f.name for f in dataclasses.fields(cls)} - base
        missing = own - audited_fields(cls.__name__)
        assert not missing, f"{cls.__name__} fields not in {AUDIT.name}: {sorted(missing)} (audit them)"
