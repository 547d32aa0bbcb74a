"""The model-FLOP formulas behind --log-tps's MFU equal the matmul FLOPs torch counts on our stacks.

torch's FlopCounterMode counts every mm/addmm/convolution (forward and backward) but not the CPU
attention kernel, so the formulas' attention terms are set aside here; and the first layer of an
encoder gets no input gradient (counted 2x, where model FLOPs count 3x). What remains must agree
exactly: decoder linears + output layer, the vision blocks + merger, the audio stem + blocks + projector.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mm_omni.models.audio.flops import audio_flops
from mm_omni.models.omni_flops import omni_batch_flops
from mm_omni.models.text.flops import row_lengths, text_flops
from mm_omni.models.vision.flops import vision_flops
from mm_omni.training.flops import peak_tflops
from tests.conftest import tiny_thinker_config
from tests.helpers import init_megatron


@pytest.fixture(scope="module")
def model():
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config
    from mm_omni.models.omni import OmniModel

    init_megatron()
    torch.manual_seed(0)
    cfg = from_hf_thinker_config(tiny_thinker_config())
    return cfg, OmniModel(cfg, dummy_encoder_forward=False)


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return sum(counter.get_flop_counts()["Global"].values())


def test_text_flops_match_counted(model):
    cfg, m = model
    t, s = cfg.text_decoder, 48
    ids = torch.randint(0, 100, (1, s))
    attention = 3 * t.num_layers * 2 * s * s * t.hidden_size
    # model FLOPs count the output layer on every row; the loss runs it only on rows with a target
    # (the last position has none once labels are shifted)
    skipped = 3 * 2 * t.hidden_size * t.vocab_size
    assert counted(lambda: m(input_ids=ids, labels=ids).loss.backward()) == text_flops(t, [s]) - attention - skipped


def test_vision_flops_match_counted(model):
    cfg, m = model
    v, grid = cfg.image_encoder.vision_encoder, [[1, 4, 8], [2, 4, 4]]  # an image and a 2-frame video
    pixels = torch.randn(sum(a * b * c for a, b, c in grid), 3 * 2 * 14 * 14)
    window, full = (v.window_attn_size // v.patch_size) ** 2, len(v.fullatt_block_indexes)
    attention = sum(3 * 4 * v.hidden_size * t * h * w * (window * (v.num_layers - full) + h * w * full)
                    for t, h, w in grid)
    embed_fwd = sum(2 * t * h * w * 3 * 2 * 14 * 14 * v.hidden_size for t, h, w in grid)
    expected = vision_flops(v, cfg.image_encoder.vision_projector, cfg.text_decoder.hidden_size, grid)
    # fc2's input width is zero-padded to a multiple of 8 for aligned GEMMs (layer_spec.py): extra FLOPs
    pad = -v.ffn_hidden_size % 8
    padding = 3 * 2 * pixels.shape[0] * v.hidden_size * pad * v.num_layers
    got = counted(lambda: m.image_encoder(pixels, torch.tensor(grid)).sum().backward())
    assert pad and got == expected - attention - embed_fwd + padding


def test_audio_flops_match_counted(model):
    cfg, m = model
    a = cfg.audio_encoder.audio_encoder
    lens = [10 * a.n_window, 6 * a.n_window]  # whole chunks: no chunk padding in the stem
    attention = sum(3 * a.num_layers * 4 * a.hidden_size * ((n - 1) // 2 + 1) * a.n_window for n in lens)
    conv1_fwd = sum(2 * n * a.num_mel_bins * 3 * a.hidden_size for n in lens)
    feats = torch.randn(len(lens), a.num_mel_bins, max(lens))
    got = counted(lambda: m.audio_encoder(feats, torch.tensor(lens)).sum().backward())
    assert got == audio_flops(a, lens) - attention - conv1_fwd


def test_batch_flops_follow_the_rows_and_media(model):
    cfg, _ = model
    t = cfg.text_decoder
    packed = {"input_ids": torch.zeros(1, 30, dtype=torch.long), "cu_seqlens": torch.tensor([0, 10, 30])}
    padded = {"input_ids": torch.zeros(2, 20, dtype=torch.long),
              "attention_mask": torch.tensor([[1] * 10 + [0] * 10, [1] * 20])}
    assert row_lengths(packed) == row_lengths(padded) == [10, 20]
    assert omni_batch_flops(cfg, packed) == omni_batch_flops(cfg, padded) == text_flops(t, [10, 20])
    media = dict(padded, image_grid_thw=torch.tensor([[1, 4, 8]]),
                 feature_attention_mask=torch.tensor([[1] * 40 + [0] * 8]))
    block = cfg.image_encoder
    assert omni_batch_flops(cfg, media) == (text_flops(t, [10, 20])
                                            + vision_flops(block.vision_encoder, block.vision_projector,
                                                           t.hidden_size, [[1, 4, 8]])
                                            + audio_flops(cfg.audio_encoder.audio_encoder, [40]))


def test_peaks_by_device_name():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("cpu") is None
