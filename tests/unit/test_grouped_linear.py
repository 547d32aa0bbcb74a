"""``GroupedLinear`` (the experts' grouped GEMM that keeps no stacked weight copy for the backward) against
``torch.nn.functional.grouped_mm``'s own autograd, fp32 on the CPU: output, input gradient and every expert's
weight gradient equal; an expert without tokens gets a zero gradient (its index known on the host or not);
frozen weights get none. ``pack_expert_weights`` moves separate expert weights into one storage without
changing the parameters or their values, and leaves weights inside a larger buffer where they are."""

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


@pytest.mark.parametrize("host_empty", [False, True], ids=["empty-on-device", "empty-on-host"])
@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
def test_equals_grouped_mm_autograd_with_an_empty_expert(host_empty, packed):
    from mm_omni.models.common.experts import GroupedLinear, pack_expert_weights

    counts = [5, 0, 7, 0]
    x, weights, offs, grad = _inputs(counts)
    want = F.grouped_mm(x, torch.stack(weights).transpose(-2, -1), offs=offs)
    want.backward(grad)
    want_grads = [x.grad.clone()] + [w.grad.clone() for w in weights]
    for t in [x, *weights]:
        t.grad = None
    if packed:
        pack_expert_weights(weights)
    empty = (1, 3) if host_empty else None
    got = GroupedLinear.apply(x, offs, empty, *weights)
    got.backward(grad)
    assert torch.allclose(got, want, atol=1e-6)
    for g, w in zip([x.grad] + [w.grad for w in weights], want_grads):
        assert torch.allclose(g, w, atol=1e-5)
    assert torch.equal(weights[1].grad, torch.zeros_like(weights[1]))
    assert torch.equal(weights[3].grad, torch.zeros_like(weights[3]))


def test_frozen_weights_get_no_gradient():
    from mm_omni.models.common.experts import GroupedLinear

    x, weights, offs, grad = _inputs([4, 6])
    for w in weights:
        w.requires_grad_(False)
    GroupedLinear.apply(x, offs, None, *weights).backward(grad)
    assert x.grad is not None and all(w.grad is None for w in weights)


def test_pack_expert_weights_keeps_the_parameters_and_their_values():
    from mm_omni.models.common.experts import pack_expert_weights, packed_view

    params = [torch.nn.Parameter(torch.randn(3, 4)) for _ in range(5)]
    before = [p.detach().clone() for p in params]
    assert packed_view(params) is None
    assert pack_expert_weights(params) is params
    view = packed_view(params)
    assert view is not None and view.shape == (5, 3, 4)
    assert torch.equal(view, torch.stack(before))
    for p, b in zip(params, before):
        assert isinstance(p, torch.nn.Parameter) and p.requires_grad and torch.equal(p, b)
    with torch.no_grad():  # the parameters are views of the one storage: an update reaches it
        params[2].add_(1)
    assert torch.equal(packed_view(params)[2], before[2] + 1)


def test_weights_inside_a_larger_buffer_stay_there():
    """As megatron's distributed optimizer lays its parameters out (here: fc1 and fc2 of each expert
    interleaved): not back to back, so each call stacks them, and nothing is moved."""
    from mm_omni.models.common.experts import pack_expert_weights, packed_view

    buffer = torch.randn(4 * (12 + 6))
    fc1 = [torch.nn.Parameter(torch.empty(0)) for _ in range(4)]
    for e, p in enumerate(fc1):
        p.data = buffer[e * 18:e * 18 + 12].view(3, 4)
    pack_expert_weights(fc1)
    assert packed_view(fc1) is None
    assert all(p.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr() for p in fc1)
