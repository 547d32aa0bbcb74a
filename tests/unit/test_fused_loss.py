"""The chunked output-layer + cross-entropy loss equals the full-logits path (fp32 CPU, rel < 1e-5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.conftest import tiny_thinker_config
from tests.helpers import init_megatron, randomize_, rel_err

TOL = 1e-5


def test_fused_lm_loss_matches_plain_cross_entropy():
    from mm_omni.models.text.fused_loss import fused_lm_loss

    gen = torch.Generator().manual_seed(0)
    s, b, h, v = 7, 2, 16, 50
    hidden = torch.randn(s, b, h, generator=gen, requires_grad=True)
    weight = torch.randn(v, h, generator=gen, requires_grad=True)
    targets = torch.randint(0, v, (b, s), generator=gen)
    upstream = torch.randn(b, s, generator=gen)

    ref = F.cross_entropy((hidden.transpose(0, 1) @ weight.t()).reshape(-1, v), targets.reshape(-1),
                          reduction="none").view(b, s)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (hidden, weight))
    for chunk in (3, 5, 100):  # several chunks, a ragged last one, one chunk
        loss = fused_lm_loss(hidden, weight, targets, chunk_tokens=chunk)
        grads = torch.autograd.grad((loss * upstream).sum(), (hidden, weight))
        assert rel_err(loss, ref) < TOL
        for got, want in zip(grads, ref_grads):
            assert rel_err(got, want) < TOL


def test_decoder_fused_loss_matches_full_logits_path():
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config
    from mm_omni.models.text import TextDecoder

    init_megatron()
    cfg = tiny_thinker_config()
    torch.manual_seed(0)
    model = TextDecoder(from_hf_thinker_config(cfg).text_decoder)
    randomize_(model, 1)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 1000, (2, 11), generator=gen)
    labels = ids.clone()
    labels[0, :3] = -100
    results = {}
    for fused in (False, True):
        model.fused_lm_loss = fused
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=labels)
        (out.per_token_loss * torch.linspace(0.5, 1.5, 11)).sum().backward()
        results[fused] = (out.per_token_loss.detach(), out.loss_mask, {n: p.grad for n, p in model.named_parameters()})
    (loss_a, mask_a, grads_a), (loss_b, mask_b, grads_b) = results[False], results[True]
    assert torch.equal(mask_a, mask_b)
    assert rel_err(loss_b, loss_a) < TOL
    worst = max(rel_err(grads_b[n], g) for n, g in grads_a.items())
    assert worst < TOL
