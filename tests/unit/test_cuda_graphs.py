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
