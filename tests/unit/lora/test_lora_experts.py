"""LoRA on the experts of a mixture-of-experts decoder (8 experts top-2, fp32 CPU): one adapter per expert
linear, named by the global expert number; with ``B`` moved off zero the model equals the same model with
``W + alpha/r * B @ A`` merged into every expert (logits and loss); the grouped-GEMM path of
:class:`~mm_omni.models.common.experts.GroupedExperts` (two more grouped GEMMs per projection) equals the loop
over experts; expert tensor parallelism is refused naming the flag."""

from __future__ import annotations

import re

import pytest
import torch

from tests.helpers import init_megatron, randomize_, rel_err
from tests.parity.test_text_moe import E, hf_text_config, make_batch, mm_text_config

R, ALPHA = 8, 16.0


def _decoder(seed: int = 0):
    from mm_omni.models.text import TextDecoder

    init_megatron()
    torch.manual_seed(seed)
    model = TextDecoder(mm_text_config(hf_text_config()))
    randomize_(model, seed + 1)
    return model


def _adapted(model):
    from mm_omni.lora.inject import apply_lora
    from mm_omni.lora.targets import parse_targets

    found = apply_lora(model, parse_targets(["linear_fc1", "linear_fc2"]), R, ALPHA, 0.0, seed=3)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # what training does to B
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return found


def _forward(model):
    cfg = hf_text_config()
    ids, labels, pos = make_batch(cfg.vocab_size)
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=pos, labels=labels, return_logits=True)
    return out.logits, out.loss


def test_every_expert_gets_its_adapter_by_global_number():
    model = _decoder()
    found = _adapted(model)
    experts = [n for n in found["adapted"] if ".local_experts." in n]
    numbers = {int(m.group(1)) for n in experts for m in [re.search(r"local_experts\.(\d+)\.", n)]}
    assert len(experts) == 3 * E * 2 and numbers == set(range(E)), experts[:4]
    for n, p in model.named_parameters():
        if ".lora_" in n:
            assert p.allreduce is True  # EP 1: an expert's weight is reduced like a dense one


def test_expert_adapters_equal_merged_weights():
    from mm_omni.lora.merge import merged_weight

    adapted, plain = _decoder(), _decoder()
    _adapted(adapted)
    merged = {}
    for name, module in adapted.named_modules():
        if hasattr(module, "lora_A"):
            merged[f"{name}.weight"] = merged_weight(module.weight.detach(), module.lora_A.weight.detach(),
                                                     module.lora_B.weight.detach(), module.lora_scale)
    assert len(merged) == 3 * E * 2
    missing, unexpected = plain.load_state_dict(merged, strict=False)
    assert not unexpected and not set(merged) & set(missing)
    (la, lossa), (lb, lossb) = _forward(adapted), _forward(plain)
    assert rel_err(la, lb) < 1e-5 and rel_err(lossa, lossb) < 1e-5
    with torch.no_grad():  # B = 0 again: exactly the base model
        for n, p in adapted.named_parameters():
            if ".lora_B." in n:
                p.zero_()
    assert rel_err(_forward(adapted)[0], _forward(_decoder())[0]) < 1e-6


@pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"), reason="torch without grouped_mm")
def test_grouped_path_with_adapters_equals_the_expert_loop(monkeypatch):
    from mm_omni.models.common import experts

    model = _decoder()
    _adapted(model)
    loop = _forward(model)
    calls = []
    real = torch.nn.functional.grouped_mm

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    # the grouped path runs on CUDA bf16 in training; its forward is checked here on the CPU in fp32
    monkeypatch.setattr(experts.GroupedExperts, "_grouped",
                        lambda self, h: all(experts._adapters(self.local_experts, fc) for fc in ("linear_fc1",
                                                                                                "linear_fc2")))
    monkeypatch.setattr(experts.F, "grouped_mm", counted)
    grouped = _forward(model)
    assert len(calls) == 3 * 6  # per layer: fc1, fc2 and two per adapter
    assert rel_err(grouped[0], loop[0]) < 1e-5 and rel_err(grouped[1], loop[1]) < 1e-5


def test_expert_tensor_parallel_is_refused_naming_the_flag():
    from mm_omni.lora.layers import add_lora
    from mm_omni.lora.targets import LoraTargetError

    model = _decoder()
    linear = model.decoder.layers[0].mlp.experts.local_experts[0].linear_fc1

    class TwoRanks:
        def size(self):
            return 2

    linear.tp_group = TwoRanks()
    with pytest.raises(LoraTargetError, match="--expert-tensor-parallel-size 1"):
        add_lora(linear, R, ALPHA, 0.0, torch.Generator().manual_seed(0))
