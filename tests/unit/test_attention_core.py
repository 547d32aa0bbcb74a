"""CoreAttention against a plain per-segment softmax attention (CPU backend and NPU dispatch)."""

import sys
import types

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from mm_omni.models.common.attention import CoreAttention, LayerwisePackedSeqParams, packed_params


def _config(heads=4, groups=2, dim=8):
    return TransformerConfig(
        num_layers=1, hidden_size=heads * dim, num_attention_heads=heads, num_query_groups=groups,
        use_cpu_initialization=True, attention_dropout=0.0,
    )


def _reference(q, k, v, segments, causal):
    """Loop over segments with an explicit softmax: [t, h, d] inputs."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    outs = []
    for start, end in zip(segments[:-1], segments[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        scores = qs @ ks.transpose(-1, -2) / q.shape[-1] ** 0.5
        if causal:
            n = end - start
            scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("causal", [False, True])
def test_packed_matches_per_segment(causal):
    torch.manual_seed(0)
    seg = [0, 3, 10, 16]
    q, k, v = torch.randn(16, 1, 4, 8), torch.randn(16, 1, 2, 8), torch.randn(16, 1, 2, 8)
    core = CoreAttention(_config(), 1, AttnMaskType.causal if causal else AttnMaskType.no_mask)
    out = core(q, k, v, None, packed_seq_params=packed_params(torch.tensor(seg)))
    ref = _reference(q[:, 0], k[:, 0], v[:, 0], seg, causal)
    torch.testing.assert_close(out[:, 0], ref.reshape(16, 32), rtol=1e-5, atol=1e-6)


def test_layerwise_params_pick_by_layer_number():
    torch.manual_seed(0)
    q, k, v = (torch.randn(8, 1, 4, 8) for _ in range(3))
    params = LayerwisePackedSeqParams(**vars(packed_params(torch.tensor([0, 4, 8]))),
                                      per_layer={1: packed_params(torch.tensor([0, 8]))})
    windowed = CoreAttention(_config(4, 4), 1, AttnMaskType.no_mask)(q, k, v, None, packed_seq_params=params)
    full = CoreAttention(_config(4, 4), 2, AttnMaskType.no_mask)(q, k, v, None, packed_seq_params=params)
    torch.testing.assert_close(windowed[:, 0], _reference(q[:, 0], k[:, 0], v[:, 0], [0, 4, 8], False).reshape(8, 32))
    torch.testing.assert_close(full[:, 0], _reference(q[:, 0], k[:, 0], v[:, 0], [0, 8], False).reshape(8, 32))


def test_padded_batch_with_megatron_mask():
    torch.manual_seed(0)
    s, b = 6, 2
    q, k, v = torch.randn(s, b, 4, 8), torch.randn(s, b, 2, 8), torch.randn(s, b, 2, 8)
    lengths = [6, 4]
    masked = torch.ones(b, 1, s, s, dtype=torch.bool)  # megatron: True = masked out
    for i, n in enumerate(lengths):
        masked[i, 0, :n, :n] = ~torch.ones(n, n, dtype=torch.bool).tril()
    out = CoreAttention(_config(), 1, AttnMaskType.causal)(q, k, v, masked)
    for i, n in enumerate(lengths):
        ref = _reference(q[:n, i], k[:n, i], v[:n, i], [0, n], True)
        torch.testing.assert_close(out[:n, i], ref.reshape(n, 32), rtol=1e-5, atol=1e-6)


def test_npu_backend_uses_tnd_fusion_attention(monkeypatch):
    """Stand-in torch_npu: the packed path must call npu_fusion_attention in TND layout."""
    calls = []

    def fake_fusion(q, k, v, n, layout, **kw):
        calls.append((layout, n, kw["actual_seq_qlen"]))
        return (_reference(q, k, v, [0] + kw["actual_seq_qlen"], False),)

    fake = types.ModuleType("torch_npu")
    fake.npu_fusion_attention = fake_fusion
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    core = CoreAttention(_config(4, 4), 1, AttnMaskType.no_mask)
    core.backend = "npu_fusion"
    q, k, v = (torch.randn(8, 1, 4, 8) for _ in range(3))
    out = core(q, k, v, None, packed_seq_params=packed_params(torch.tensor([0, 5, 8])))
    assert calls == [("TND", 4, [5, 8])]
    assert out.shape == (8, 1, 32)
