"""The encoders' item protocol (``mm_omni.models.common.encoder_api.ItemEncoder``), what the hetero split relies
on: the declared token counts are the rows each item yields, a subset of items encodes to exactly those items'
rows of the full call, several batches joined into one call give their outputs in order, and the dummy input
is one item of the encoder's dtype. Vision (images + a video, by ``grid_thw``) and audio (padded and flat
clips, by their mel frames); fp32, 1e-6."""

from __future__ import annotations

import pytest
import torch

from mm_omni.models.common.encoder_api import ItemEncoder, dummy_forward, item_starts
from tests.conftest import tiny_thinker_config
from tests.helpers import init_megatron

PATCH = 3 * 2 * 14 * 14


@pytest.fixture(scope="module")
def model():
    from mm_omni.models.omni import OmniModel
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config

    init_megatron()
    torch.manual_seed(0)
    return OmniModel(from_hf_thinker_config(tiny_thinker_config()), dummy_encoder_forward=False).eval()


def _vision_batch(gen, grids):
    return torch.randn(sum(t * h * w for t, h, w in grids), PATCH, generator=gen), torch.tensor(grids)


def _audio_batch(gen, lens, flat=False):
    feats = torch.randn(len(lens), 128, max(lens), generator=gen)
    lens = torch.tensor(lens)
    if flat:  # transformers' layout: every clip's valid frames side by side
        feats = torch.cat([clip[:, :n] for clip, n in zip(feats, lens.tolist())], dim=1)
    return feats, lens


def _cases(gen):
    return [("image_encoder", _vision_batch(gen, [[1, 4, 8], [2, 4, 4], [1, 8, 4]]),
             _vision_batch(gen, [[1, 4, 4]])),
            ("audio_encoder", _audio_batch(gen, [40, 17, 33]), _audio_batch(gen, [25])),
            ("audio_encoder", _audio_batch(gen, [40, 17, 33], flat=True), _audio_batch(gen, [25], flat=True))]


@torch.no_grad()
def test_items_split_and_join_like_the_full_call(model):
    for name, (data, sizes), other in _cases(torch.Generator().manual_seed(0)):
        encoder = getattr(model, name)
        assert isinstance(encoder, ItemEncoder)
        full = encoder(data, sizes)
        tokens = encoder.item_tokens(sizes)
        assert sum(tokens) == full.shape[0] and len(encoder.item_costs(sizes)) == len(tokens) == len(sizes), name
        starts = item_starts(tokens)
        for items in ([1], [2, 0], [0, 1, 2]):
            part = encoder(*encoder.take_items(data, sizes, items))
            want = torch.cat([full[starts[i]:starts[i + 1]] for i in items])
            torch.testing.assert_close(part, want, rtol=1e-6, atol=1e-6, msg=f"{name} items {items}")
        joined = encoder(*encoder.join_items([(data, sizes), other]))
        torch.testing.assert_close(joined, torch.cat([full, encoder(*other)]), rtol=1e-6, atol=1e-6, msg=name)


def test_item_costs_are_patches_and_mel_frames(model):
    assert model.image_encoder.item_costs(torch.tensor([[1, 4, 8], [2, 4, 4]])) == [32, 32]
    assert model.image_encoder.item_tokens(torch.tensor([[1, 4, 8], [2, 4, 4]])) == [8, 8]  # merge 2 x 2
    assert model.audio_encoder.item_costs(torch.tensor([40, 17])) == [40, 17]
    assert model.audio_encoder.item_tokens(torch.tensor([40, 17])) == [10, 4]  # ((L - 1) // 2 + 1 - 2) // 2 + 1


def test_dummy_input_is_one_item_of_the_encoders_dtype(model):
    for name, encoder in model.encoders().items():
        data, sizes = encoder.dummy_inputs()
        assert data.dtype == next(encoder.parameters()).dtype and len(sizes) == 1, name
        assert dummy_forward(encoder).shape[0] == sum(encoder.item_tokens(sizes)), name
