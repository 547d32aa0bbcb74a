"""Padding matches transformers' batched get_rope_index; packing keeps every row's tokens,
labels and positions identical to the unpacked row."""

from __future__ import annotations

import pytest
import torch

from mm_omni.config.data import load_data_config
from mm_omni.data.collate import OmniCollator
from mm_omni.data.encode import RowEncoder
from mm_omni.data.formats import normalise_row
from mm_omni.data.template import IGNORE_INDEX
from tests.fixtures.qwen2_5_omni import hf_rope_index, tiny_data_config

ROWS = [
    {"messages": [{"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A cat."}],
     "images": ["b.png"]},
    {"messages": [{"role": "user", "content": "<audio>Say?"}, {"role": "assistant", "content": "hello there"}],
     "audios": ["long.wav"]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "user", "content": "<video><image>Both?"}, {"role": "assistant", "content": "yes"}],
     "videos": ["v.mp4"], "images": ["a.png"]},
]


@pytest.fixture(scope="module")
def encoded(processor, processor_dir, media_dir):
    cfg = load_data_config(tiny_data_config(processor_dir, media_dir, "unused.json", use_audio_in_video=True))
    enc = RowEncoder(cfg, 4096, processor=processor)
    rows = [enc.encode(normalise_row(r, cfg.dataset_param.attr, str(media_dir), "d", i)) for i, r in enumerate(ROWS)]
    return enc, rows


def test_padded_batch_matches_transformers(encoded):
    enc, rows = encoded
    rows = rows[:3]  # transformers takes one use_audio_in_video per batch: these rows have no video
    batch = OmniCollator(enc.tokens.pad)(rows)
    ref = hf_rope_index(enc.tokens, enc.rope, batch["input_ids"], batch["attention_mask"],
                        image_grid_thw=batch["image_grid_thw"],
                        audio_seqlens=batch["feature_attention_mask"].sum(-1))
    assert torch.equal(batch["position_ids"], ref)
    assert batch["input_ids"].shape[1] % 8 == 0
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert torch.equal(batch["labels"][i, :n], r["labels"]) and (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][i].sum() == n


def test_packing_equals_unpacked(encoded):
    enc, rows = encoded
    packed = OmniCollator(enc.tokens.pad, packing=True)(rows)
    padded = OmniCollator(enc.tokens.pad)(rows)
    cu = packed["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu.tolist() == [0] + torch.cumsum(
        torch.tensor([len(r["input_ids"]) for r in rows]), 0).tolist()
    assert packed["input_ids"].shape == (1, int(cu[-1])) and packed["position_ids"].shape == (3, 1, int(cu[-1]))
    for i, r in enumerate(rows):
        a, b = int(cu[i]), int(cu[i + 1])
        assert torch.equal(packed["input_ids"][0, a:b], r["input_ids"])
        assert torch.equal(packed["position_ids"][:, 0, a:b], r["position_ids"])
        # labels identical except the first one, which no shifted loss ever uses
        assert packed["labels"][0, a] == IGNORE_INDEX
        assert torch.equal(packed["labels"][0, a + 1:b], r["labels"][1:])
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                "input_features", "feature_attention_mask", "use_audio_in_video"):
        assert torch.equal(packed[key], padded[key]), key
    assert packed["use_audio_in_video"].tolist() == [False, False, False, True]
    # audio features keep row order: the long.wav row first, then v.mp4's track
    assert packed["input_features"].shape[0] == 2
