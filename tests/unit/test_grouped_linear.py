"""``GroupedLinear`` (the experts' grouped GEMM that keeps no stacked weight copy for the backward) against
``torch.nn.functional.grouped_mm``'s own autograd, fp32 on the CPU: output, input gradient and every expert's
weight gradient equal; an expert without tokens gets a zero gradient; frozen weights get none."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="torch without grouped_mm")


def _inputs(counts, d_in=16, d_out=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), d_in, generator=gen, requires_grad=True)
    weights = [torch.randn(d_out, d_in, generator=gen, requires_grad=True) for _ in counts]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    return x, weights, offs, torch.randn(sum(counts), d_out, generator=gen)


def test_equals_grouped_mm_autograd_with_an_empty_expert():
    from mm_omni.models.common.experts import GroupedLinear

    counts = [5, 0, 7, 3]
    x, weights, offs, grad = _inputs(counts)
    want = F.grouped_mm(x, torch.stack(weights).transpose(-2, -1), offs=offs)
    want.backward(grad)
    want_grads = [x.grad.clone()] + [w.grad.clone() for w in weights]
    for t in [x, *weights]:
        t.grad = None
    got = GroupedLinear.apply(x, offs, *weights)
    got.backward(grad)
    assert torch.allclose(got, want, atol=1e-6)
    for g, w in zip([x.grad] + [w.grad for w in weights], want_grads):
        assert torch.allclose(g, w, atol=1e-5)
    assert torch.equal(weights[1].grad, torch.zeros_like(weights[1]))


def test_frozen_weights_get_no_gradient():
    from mm_omni.models.common.experts import GroupedLinear

    x, weights, offs, grad = _inputs([4, 6])
    for w in weights:
        w.requires_grad_(False)
    GroupedLinear.apply(x, offs, *weights).backward(grad)
    assert x.grad is not None and all(w.grad is None for w in weights)
