"""Context-parallel splitting and masks, one process: every CP rank is simulated with a stand-in group.

Attention of a rank's zig-zag queries against the gathered keys (the gathered rows in rank order, as
``all_gather`` delivers them) must equal the rows of full causal attention: padded rows (with
padding), packed rows (per-sequence split), and on CUDA the flash varlen path of packed rows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mm_omni.models.common.attention import block_diagonal_mask, varlen_attention
from mm_omni.parallel.context_parallel import (
    ContextParallelPackedSeqParams, pad_for_context_parallel, split_for_context_parallel, token_index,
)


class FakeGroup:
    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def test_zigzag_index_covers_every_token_once():
    assert token_index(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert token_index(8, 2, 1).tolist() == [2, 3, 4, 5]
    cu = torch.tensor([0, 8, 12])
    assert token_index(12, 2, 0, cu).tolist() == [0, 1, 6, 7, 8, 11]
    every = torch.cat([token_index(24, 3, r, torch.tensor([0, 12, 24])) for r in range(3)])
    assert sorted(every.tolist()) == list(range(24))
    with pytest.raises(ValueError, match="pad every sequence"):
        token_index(10, 2, 0)


def _attend(q, k, v, keep_mask):
    """SDPA on [b, h, s, d] with a keep-mask broadcastable to [b, h, sq, sk]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep_mask)


@pytest.mark.parametrize("cp", [2, 4])
def test_padded_rows_match_full_attention(cp):
    torch.manual_seed(0)
    b, h, s, d = 2, 2, 16, 8
    q, k, v = (torch.randn(b, h, s, d) for _ in range(3))
    keep = torch.ones(b, s, dtype=torch.long)
    keep[1, 11:] = 0  # right padding in the second row
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    full = _attend(q, k, v, (causal & keep.bool()[:, None, None, :]) | torch.eye(s, dtype=torch.bool))
    for r in range(cp):
        split = split_for_context_parallel(FakeGroup(cp, r), s)
        kv = split.kv_index  # the gathered K/V rows, in rank order
        out = _attend(q[:, :, split.index], k[:, :, kv], v[:, :, kv], ~split.attention_mask(keep))
        real = keep.bool()[:, split.index]
        torch.testing.assert_close(out.transpose(1, 2)[real], full[:, :, split.index].transpose(1, 2)[real],
                                   rtol=1e-6, atol=1e-6)


def test_packed_row_matches_full_attention():
    torch.manual_seed(0)
    h, d, cp = 2, 8, 2
    cu = torch.tensor([0, 12, 20, 28])
    t = int(cu[-1])
    q, k, v = (torch.randn(1, h, t, d) for _ in range(3))
    full = _attend(q, k, v, block_diagonal_mask(cu, causal=True))
    for r in range(cp):
        split = split_for_context_parallel(FakeGroup(cp, r), t, cu)
        params = split.packed_params()
        assert isinstance(params, ContextParallelPackedSeqParams)
        assert split.local_cu_seqlens().tolist() == [0, 6, 10, 14]
        kv = split.kv_index
        out = _attend(q[:, :, split.index], k[:, :, kv], v[:, :, kv], ~params.dense_mask())
        torch.testing.assert_close(out, full[:, :, split.index], rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash varlen needs CUDA")
def test_packed_varlen_matches_full_attention_cuda():
    torch.manual_seed(0)
    h, hk, d, cp = 4, 2, 64, 2
    cu = torch.tensor([0, 128, 192, 448])
    t = int(cu[-1])
    dev, dt = "cuda", torch.bfloat16
    q, k, v = (torch.randn(t, n, d, device=dev, dtype=dt) for n in (h, hk, hk))
    cu_d = cu.to(dev, torch.int32)
    full = varlen_attention(q, k, v, cu_d, 256, causal=True)
    for r in range(cp):
        split = split_for_context_parallel(FakeGroup(cp, r), t, cu, device=dev)
        p = split.packed_params()
        kv = split.kv_index
        kg, vg = k[kv].index_select(0, p.kv_gather), v[kv].index_select(0, p.kv_gather)
        out = varlen_attention(q[split.index], kg, vg, p.cu_seqlens_q, p.max_seqlen_q, True,
                               cu_seqlens_kv=p.cu_seqlens_kv, max_len_kv=p.max_seqlen_kv)
        torch.testing.assert_close(out.float(), full[split.index].float(), rtol=2e-2, atol=2e-2)


def test_pad_for_context_parallel_packed_and_padded():
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    ids = torch.arange(1, 13)[None]
    pos = torch.arange(12).expand(3, 1, 12)
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": pos, "cu_seqlens": cu,
             "attention_mask": torch.ones_like(ids)}
    out = pad_for_context_parallel(batch, 4)
    assert out["cu_seqlens"].tolist() == [0, 8, 16] and out["cu_seqlens"].dtype == torch.int32
    assert out["input_ids"][0, :8].tolist() == [1, 2, 3, 4, 5, 0, 0, 0]
    assert out["labels"][0, 5:8].tolist() == [-100] * 3 and out["labels"][0, 8:15].tolist() == list(range(6, 13))
    assert out["position_ids"][0, 0, 8:15].tolist() == list(range(5, 12))  # real positions unchanged
    padded = {"input_ids": torch.ones(2, 6, dtype=torch.long), "labels": torch.ones(2, 6, dtype=torch.long)}
    out = pad_for_context_parallel(padded, 4)
    assert out["input_ids"].shape == (2, 8) and out["labels"][:, 6:].eq(-100).all()
    assert pad_for_context_parallel(out, 4) is out
