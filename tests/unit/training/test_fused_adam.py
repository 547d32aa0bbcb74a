"""Switching megatron-core's torch AdamW to the fused kernel after construction gives the same update."""

from __future__ import annotations

import torch

from mm_omni.training.optimizer import use_fused_adam


def _run(fused: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((64, 32), (32,), (7, 5, 3))]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    if fused:
        assert use_fused_adam([opt, sgd]) == 1  # Adam/AdamW only
        assert all(g["fused"] and not g["foreach"] for g in opt.param_groups) and not sgd.param_groups[0].get("fused")
    for step in range(3):
        for i, p in enumerate(params):
            p.grad = torch.full_like(p, 0.1 * (i + 1)) + torch.sin(p.detach() * (step + 1))
        opt.step()
    return [p.detach().clone() for p in params]


def test_fused_adam_matches_the_default_update():
    for a, b in zip(_run(False), _run(True)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
