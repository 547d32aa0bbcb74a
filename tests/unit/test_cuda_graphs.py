"""Encoder CUDA graphs are opt-in and CUDA-only: on the CPU, turning them on changes nothing."""

from __future__ import annotations

import torch

from tests.conftest import tiny_thinker_config
from tests.helpers import init_megatron


def test_enable_encoder_cuda_graphs_is_a_no_op_on_cpu():
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config
    from mm_omni.models.common.cuda_graphs import enable_encoder_cuda_graphs
    from mm_omni.models.omni import OmniModel

    init_megatron()
    torch.manual_seed(0)
    model = OmniModel(from_hf_thinker_config(tiny_thinker_config()))
    audio = model.audio_encoder.encoder
    vision = model.image_encoder.encoder
    assert audio.graphed_blocks is None and vision.graphed_blocks is None  # off by default
    feats = torch.randn(2, 128, 40)
    lens = torch.tensor([40, 23])
    pixels = torch.randn(4 * 8, 3 * 2 * 14 * 14)
    grid = torch.tensor([[1, 4, 8]])
    eager = (audio(feats, lens), vision(pixels, grid)[0])
    assert enable_encoder_cuda_graphs(model) == 2
    assert not audio.graphed_blocks.usable(feats)  # CPU: eager, same math
    graphed = (audio(feats, lens), vision(pixels, grid)[0])
    for a, b in zip(eager, graphed):
        assert torch.equal(a, b)
    assert not audio.graphed_blocks.entries and not vision.graphed_blocks.entries


def test_qwen3_omni_encoders_graphed_path_equals_eager(monkeypatch):
    """The Qwen3 vision encoder (its deepstack taps returned side by side from one graph) and the AuT encoder
    (convolutions to projection in one graph) through ``GraphedBlocks.call`` with the capture replaced by the
    function itself (the CPU has no CUDA graphs): outputs and every parameter gradient equal eager, and one
    entry per shape is made."""
    from mm_omni import platform
    from mm_omni.models.common import cuda_graphs
    from mm_omni.models.qwen3_omni_moe.hf_config import from_hf_thinker_config
    from mm_omni.models.qwen3_omni_moe.model import Qwen3OmniModel
    from tests.fixtures.qwen3_omni_moe import PATCH, tiny_thinker_config as tiny_qwen3

    init_megatron()
    torch.manual_seed(0)
    model = Qwen3OmniModel(from_hf_thinker_config(tiny_qwen3())).train()
    vision, audio = model.image_encoder, model.audio_encoder
    gen = torch.Generator().manual_seed(1)
    grid = torch.tensor([[1, 4, 6], [2, 2, 2]])
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * PATCH * PATCH, generator=gen)
    feats, lens = torch.randn(2, 16, 230, generator=gen), torch.tensor([230, 97])

    def run():
        model.zero_grad(set_to_none=True)
        v, a = vision(pixels, grid), audio(feats, lens)
        (v.square().sum() + a.square().sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return v.detach(), a.detach(), grads

    eager = run()
    monkeypatch.setattr(platform, "make_graphed_callables", lambda fn, sample, **kw: fn)
    monkeypatch.setattr(cuda_graphs.GraphedBlocks, "usable", lambda self, hidden: torch.is_grad_enabled())
    assert cuda_graphs.enable_encoder_cuda_graphs(model) == 2
    graphed = run()
    assert torch.allclose(graphed[0], eager[0], atol=1e-6) and torch.allclose(graphed[1], eager[1], atol=1e-6)
    assert graphed[2].keys() == eager[2].keys() and len(eager[2]) > 20
    for name, g in eager[2].items():
        assert torch.allclose(graphed[2][name], g, atol=1e-6, rtol=1e-5), name
    assert len(vision.encoder.graphed_blocks.entries) == 1 and len(audio.encoder.graphed_blocks.entries) == 1
