"""AuT audio encoder vs transformers' ``Qwen3OmniMoeAudioEncoder``: same weights, fp32 CPU, rel err < 1e-5.

Clips of several lengths in one call, given as transformers' thinker gives them (padded features and a
``feature_attention_mask`` turned into the flat valid frames) and padded per clip: shorter than a chunk
(100 mel frames), exactly one, and longer than a chunk and than an attention window (``n_window_infer``
= 200 frames: 26 tokens), in batches whose longest chunk is full and in one whose longest chunk is not.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import init_megatron, randomize_, rel_err

TOL = 1e-5
LENS = (37, 100, 430, 250)  # 430: 4 full chunks + 30 frames = 56 tokens = windows of 26, 26, 4


def tiny_audio_config(**overrides):
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeAudioEncoderConfig

    kwargs = dict(num_mel_bins=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=44, d_model=32,
                  output_dim=40, downsample_hidden_size=8, n_window=50, n_window_infer=200, conv_chunksize=3,
                  max_source_positions=64)
    kwargs.update(overrides)
    cfg = Qwen3OmniMoeAudioEncoderConfig(**kwargs)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_hf_audio(cfg, seed: int = 0):
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeAudioEncoder

    torch.manual_seed(seed)
    hf = Qwen3OmniMoeAudioEncoder(cfg).float()
    randomize_(hf, seed + 1)  # norms and biases too, so their gradients matter
    return hf


def build_mm_audio(cfg, pg_collection=None):
    from mm_omni.models.audio_aut.encoder import AuTEncoder
    from mm_omni.models.audio_aut.hf_config import from_hf_audio_config

    return AuTEncoder(from_hf_audio_config(cfg), pg_collection=pg_collection)


def hf_audio_to_mm(cfg, hf_state) -> dict:
    from mm_omni.models.audio_aut.hf_mapping import hf_state_to_mm

    return hf_state_to_mm(cfg, {f"audio_tower.{k}": v for k, v in hf_state.items()})


def load_mm(model, mm_state: dict):
    state = {k[len("audio_encoder."):]: v for k, v in mm_state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("_extra_state") for k in missing), missing


def make_inputs(cfg, lens=LENS, seed: int = 1):
    """Padded features [n, mel, T] (padding zero), their mask, the flat valid frames, lens, and loss weights."""
    gen = torch.Generator().manual_seed(seed)
    padded = torch.randn(len(lens), cfg.num_mel_bins, max(lens), generator=gen)
    mask = (torch.arange(max(lens))[None] < torch.tensor(lens)[:, None]).long()
    padded = padded * mask[:, None]
    flat = padded.permute(0, 2, 1)[mask.bool()].t()  # what the thinker's get_audio_features makes of the mask
    tokens = int(_hf_lengths(torch.tensor(lens)).sum())
    return padded, mask, flat, torch.tensor(lens), torch.randn(tokens, cfg.output_dim, generator=gen)


def _hf_lengths(lens):
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    return _get_feat_extract_output_lengths(lens, 50)


def run_hf(hf, flat, lens, probe):
    flat = flat.clone().requires_grad_(True)
    out = hf(flat, feature_lens=lens).last_hidden_state
    (out * probe).sum().backward()
    return out.detach(), flat.grad, {k: p.grad for k, p in hf.named_parameters()}


def run_mm(model, features, lens, probe):
    features = features.clone().requires_grad_(True)
    out = model(features, lens)
    (out * probe).sum().backward()
    return out.detach(), features.grad, {k: p.grad for k, p in model.named_parameters()}


@pytest.fixture(scope="module")
def models():
    init_megatron()
    cfg = tiny_audio_config()
    hf = build_hf_audio(cfg)
    ours = build_mm_audio(cfg)
    load_mm(ours, hf_audio_to_mm(cfg, hf.state_dict()))
    return cfg, hf, ours


def test_output_lengths_match_transformers():
    from mm_omni.models.audio_aut.layout import aut_output_lengths

    lens = torch.arange(1, 2001)
    assert torch.equal(aut_output_lengths(lens), _hf_lengths(lens))
    assert aut_output_lengths(torch.tensor([100, 1000])).tolist() == [13, 130]


@pytest.mark.parametrize("lens", [LENS, (5, 37, 64), (100,), (301, 1)])
def test_forward_matches_transformers(models, lens):
    cfg, hf, ours = models
    padded, mask, flat, feature_lens, _ = make_inputs(cfg, lens)
    with torch.no_grad():
        ref = hf(flat, feature_lens=feature_lens).last_hidden_state
        out_flat = ours(flat, feature_lens)
        out_padded = ours(padded, mask.sum(-1))
    assert out_flat.shape == ref.shape == (int(_hf_lengths(feature_lens).sum()), 40)
    assert ours.item_tokens(feature_lens) == _hf_lengths(feature_lens).tolist()
    assert rel_err(out_flat, ref) < TOL
    assert rel_err(out_padded, ref) < TOL


def test_grads_match_transformers(models):
    """Input-feature gradients and every parameter's, through the table."""
    cfg, hf, ours = models
    padded, mask, flat, lens, probe = make_inputs(cfg)
    hf.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    ref_out, ref_feature_grad, ref_grads = run_hf(hf, flat, lens, probe)
    out, feature_grad, grads = run_mm(ours, flat, lens, probe)
    assert rel_err(out, ref_out) < TOL
    assert rel_err(feature_grad, ref_feature_grad) < TOL
    expected = hf_audio_to_mm(cfg, ref_grads)
    grads = {f"audio_encoder.{k}": g for k, g in grads.items()}
    assert set(expected) == set(grads)
    assert all(g is not None and g.abs().max() > 0 for g in grads.values())
    errors = {k: rel_err(grads[k], g) for k, g in expected.items()}
    assert max(errors.values()) < TOL, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


def test_layout_matches_transformers_indices():
    """Kept-token indices and attention windows equal transformers' helpers."""
    from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as hf_mod

    from mm_omni.models.audio_aut.layout import aut_layout

    for lens, infer in (([37, 100, 430, 250], 200), ([5, 37, 64], 800), ([1000, 1], 800), ([999, 250], 300)):
        lens = torch.tensor(lens)
        layout = aut_layout(lens, 50, infer)
        _, chunk_lengths = hf_mod.chunk_and_pad_features(torch.zeros(2, int(lens.sum())), lens, 50)
        assert torch.equal(layout.chunks.chunk_frames, chunk_lengths)
        assert layout.width == int(chunk_lengths.max())
        assert torch.equal(layout.token_index, hf_mod.get_valid_indices(chunk_lengths, 50))
        assert torch.equal(layout.cu_seqlens, hf_mod.get_audio_cu_seqlens(chunk_lengths, lens, infer, 50))


def test_padding_content_is_ignored(models):
    cfg, _, ours = models
    padded, _, _, lens, _ = make_inputs(cfg)
    noisy = padded.clone()
    noisy[0, :, 37:] = 100.0
    with torch.no_grad():
        assert torch.equal(ours(padded, lens), ours(noisy, lens))


def test_items_round_trip(models):
    cfg, _, ours = models
    padded, _, flat, lens, _ = make_inputs(cfg, (130, 240))  # both pad their convolutions to a full chunk
    parts = [ours.take_items(padded, lens, [1]), ours.take_items(flat, lens, [0])]
    with torch.no_grad():
        full = ours(flat, lens)
        joined = ours(*ours.join_items(parts))
        dummy = ours(*ours.dummy_inputs())
    first = ours.item_tokens(lens)[0]
    assert torch.equal(joined, torch.cat([full[first:], full[:first]]))
    assert dummy.shape == (1, 40)


def test_empty_clip_is_an_error(models):
    cfg, _, ours = models
    with pytest.raises(ValueError, match="at least one mel frame"):
        ours(torch.zeros(2, cfg.num_mel_bins, 20), torch.tensor([20, 0]))


@pytest.mark.parametrize("overrides, field", [
    (dict(n_window=40), "n_window"),
    (dict(n_window_infer=60), "n_window_infer"),
    (dict(dropout=0.1), "dropout"),
    (dict(scale_embedding=True), "scale_embedding"),
    (dict(activation_function="relu2"), "activation_function"),
])
def test_unsupported_config_values_are_refused(overrides, field):
    from mm_omni.models.audio_aut.hf_fields import check_audio_config

    with pytest.raises(ValueError, match=f"audio_config.{field}="):
        check_audio_config(tiny_audio_config(**overrides))


def test_flops_grow_with_windows():
    from mm_omni.models.audio_aut.flops import aut_flops
    from mm_omni.models.audio_aut.hf_config import from_hf_audio_config

    cfg = from_hf_audio_config(tiny_audio_config())
    one, two = aut_flops(cfg, [100]), aut_flops(cfg, [100, 100])
    assert two == 2 * one > 0
    # 400 frames: 52 tokens in two windows of 26, cheaper in attention than one window of 52
    wide = from_hf_audio_config(tiny_audio_config(n_window_infer=400))
    assert aut_flops(wide, [400]) - aut_flops(cfg, [400]) == 3 * 2 * 4 * 32 * (52**2 - 2 * 26**2)


def test_every_hf_field_is_audited():
    """The field list of hf_fields names every field transformers declares (a new one fails until audited)."""
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeAudioEncoderConfig

    from mm_omni.models.audio_aut import hf_fields

    missing = [f for f in Qwen3OmniMoeAudioEncoderConfig.__annotations__ if f"``{f}``" not in hf_fields.__doc__]
    assert not missing, missing


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "silu"])
def test_activation_is_honoured(act):
    """``activation_function`` drives the blocks' MLP and the proj1 -> proj2 activation alike."""
    init_megatron()
    cfg = tiny_audio_config(activation_function=act)
    hf = build_hf_audio(cfg)
    ours = build_mm_audio(cfg)
    load_mm(ours, hf_audio_to_mm(cfg, hf.state_dict()))
    _, _, flat, lens, _ = make_inputs(cfg)
    with torch.no_grad():
        assert rel_err(ours(flat, lens), hf(flat, feature_lens=lens).last_hidden_state) < TOL


@pytest.mark.parametrize("update, field", [(dict(n_window=60), "n_window"), (dict(n_window_infer=99), "n_window_infer"),
                                           (dict(max_source_positions=12), "max_source_positions")])
def test_module_config_refuses_what_the_encoder_cannot_run(update, field):
    from mm_omni.models.audio_aut.config import AuTEncoderConfig
    from mm_omni.models.audio_aut.hf_config import from_hf_audio_config

    good = from_hf_audio_config(tiny_audio_config()).model_dump()
    with pytest.raises(ValueError, match=f"{field}="):
        AuTEncoderConfig.model_validate({**good, **update})
