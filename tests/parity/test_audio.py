"""Audio encoder vs transformers' Qwen2.5-Omni audio tower: same weights, fp32 CPU, rel err < 1e-5."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_thinker_config
from tests.helpers import init_megatron, rel_err

TOL = 1e-5


def hf_audio_to_mm(hf_state, thinker_cfg):
    """HF thinker names -> MindSpeed-MM names through the converter's table."""
    from converters.common.convert import hf_state_to_mm
    from mm_omni.models.qwen2_5_omni.convert import SPEC

    return hf_state_to_mm(SPEC, thinker_cfg, hf_state)


def load_mm_audio(model, mm_state):
    state = {k[len("audio_encoder."):]: v for k, v in mm_state.items() if k.startswith("audio_encoder.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("_extra_state") for k in missing), missing


@pytest.fixture(scope="module")
def models():
    init_megatron()
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration

    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config
    from mm_omni.models.audio import AudioEncoder

    thinker_cfg = tiny_thinker_config()
    torch.manual_seed(0)
    hf = Qwen2_5OmniThinkerForConditionalGeneration(thinker_cfg).float()
    # transformers initialises LayerNorms to (1, 0) and biases to 0: randomise so the parity test sees them
    with torch.no_grad():
        for name, p in hf.model.audio_tower.named_parameters():
            if "norm" in name or "ln_post" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    ours = AudioEncoder(from_hf_thinker_config(thinker_cfg).audio_encoder.audio_encoder)
    load_mm_audio(ours, hf_audio_to_mm(hf.state_dict(), thinker_cfg))
    return hf, ours


def _inputs(lens=(37, 100), mel=128):
    torch.manual_seed(1)
    padded = torch.randn(len(lens), mel, max(lens))
    mask = torch.arange(max(lens))[None] < torch.tensor(lens)[:, None]
    padded = padded * mask[:, None]  # padding content must not matter; zero it for the flat view
    flat = padded.permute(0, 2, 1)[mask].t()  # transformers' [mel, sum(lens)] of the valid frames
    return padded, flat, torch.tensor(lens)


def _hf_forward(hf, flat, lens):
    tower = hf.model.audio_tower
    after_cnn, _ = tower._get_feat_extract_output_lengths(lens)
    return tower(flat, feature_lens=lens, aftercnn_lens=after_cnn).last_hidden_state


def test_positions_match_transformers(models):
    hf, ours = models
    torch.testing.assert_close(ours.encoder.positional_embedding,
                               hf.model.audio_tower.positional_embedding.positional_embedding, rtol=0, atol=0)
    assert not any("positional_embedding" in k for k in ours.state_dict())


@pytest.mark.parametrize("lens", [(37, 100), (5,), (16, 33, 1, 48)])
def test_forward_matches_transformers(models, lens):
    hf, ours = models
    padded, flat, feature_lens = _inputs(lens)
    with torch.no_grad():
        ref = _hf_forward(hf, flat, feature_lens)
        out_padded = ours(padded, feature_lens)
        out_flat = ours(flat, feature_lens)
    expected = sum(((n - 1) // 2 + 1) // 2 for n in lens)
    assert out_padded.shape == ref.shape == (expected, 64)
    assert rel_err(out_padded, ref) < TOL
    assert rel_err(out_flat, ref) < TOL


def test_padding_content_is_ignored(models):
    _, ours = models
    padded, _, lens = _inputs()
    noisy = padded.clone()
    noisy[0, :, 37:] = 100.0
    with torch.no_grad():
        assert torch.equal(ours(padded, lens), ours(noisy, lens))


def test_grads_match_transformers(models):
    hf, ours = models
    padded, flat, lens = _inputs()
    hf.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    weight = torch.randn(sum(((n - 1) // 2 + 1) // 2 for n in lens.tolist()), 64)
    (_hf_forward(hf, flat, lens) * weight).sum().backward()
    (ours(padded, lens) * weight).sum().backward()

    hf_grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in hf.named_parameters()}
    expected = hf_audio_to_mm(hf_grads, tiny_thinker_config())
    checked = 0
    for name, p in ours.named_parameters():
        key = f"audio_encoder.{name}"
        if not p.requires_grad:  # audio_bos_eos_token: unused in forward, no grad in transformers either
            assert hf.model.audio_tower.audio_bos_eos_token.weight.grad is None
            continue
        err = rel_err(p.grad, expected[key])
        assert err < TOL, f"{key}: grad rel err {err:.2e}"
        checked += 1
    assert checked == len([p for p in ours.parameters() if p.requires_grad]) > 20


def test_layout_matches_transformers_indices():
    """Chunk boundaries and pooling pairs equal transformers' helpers (clip lengths not multiples of 16)."""
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as hf_mod

    from mm_omni.models.audio.front_end import chunk_layout

    lens = torch.tensor([37, 100, 16, 1, 17])
    layout = chunk_layout(lens, n_window=8)
    _, chunk_lengths = hf_mod.chunk_and_pad_features(torch.zeros(4, int(lens.sum())), lens, 8)
    assert torch.equal(layout.chunk_frames, chunk_lengths)
    assert torch.equal(layout.cu_seqlens, hf_mod.get_audio_cu_seqlens(chunk_lengths))
    assert torch.equal(layout.pool_index, hf_mod.get_pool_indices(lens))
    assert layout.max_chunk_tokens == 8


def test_empty_clip_is_an_error():
    from mm_omni.models.audio.front_end import chunk_layout

    with pytest.raises(ValueError, match="at least one mel frame"):
        chunk_layout(torch.tensor([20, 0]), n_window=8)
