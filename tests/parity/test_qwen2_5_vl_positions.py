"""Qwen2.5-VL's M-RoPE positions from the data pipeline (template ``qwen2vl``) against transformers.

Rows go through the real pipeline (tiny ``Qwen2_5_VLProcessor``, PNG / MP4 files, the checkpoint's config.json
for ``tokens_per_second``): text only, an image, a short video, an image and a long video.

transformers holds two versions of the rule. Its Qwen2.5-VL ``get_rope_index`` (5.3 and later) starts the text
after a video at ``max(h, w) / merge`` past the video's first position; the Qwen team's original code,
transformers up to 5.2 and transformers' own Qwen2.5-Omni ``get_rope_index`` start it one past the video's
largest position, which is later once the video's time span, ``(t - 1) * tokens_per_second * seconds per
grid``, reaches its merged height or width. We follow the original rule (the positions the released checkpoints
were trained with). Where the two agree (text, images, the short video) ours equal transformers' Qwen2.5-VL
function; on the long video they equal the original rule as transformers' Qwen2.5-Omni function computes it,
and differ from transformers' Qwen2.5-VL function exactly in where the text after the video starts.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import pytest
import torch

from tests.fixtures.media import write_dataset, write_image, write_video
from tests.fixtures.qwen2_5_vl import build_tiny_vl_processor, tiny_vl_config, tiny_vl_data_config, write_vl_config_json

TPS = 2
ROWS = [
    {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "user", "content": "<image>What is in this image?"},
                  {"role": "assistant", "content": "A cat."}], "images": ["a.png"]},
    {"messages": [{"role": "user", "content": "<video>What is she doing?"},
                  {"role": "assistant", "content": "Playing with a ball."}], "videos": ["short.mp4"]},
    {"messages": [{"role": "user", "content": "<image>Compare these two pictures. <video>Describe the video."},
                  {"role": "assistant", "content": "A dog, then a cat."}], "images": ["b.png"],
     "videos": ["long.mp4"]},
]


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    from mm_omni.config.data import load_data_config
    from mm_omni.data.dataset import OmniSFTDataset

    d = tmp_path_factory.mktemp("vl_positions")
    media = d / "media"
    media.mkdir()
    write_image(media / "a.png", 56, 56, seed=0)
    write_image(media / "b.png", 84, 56, seed=1)
    # 112 x 112 at 2 fps: 8 x 8 patches (4 x 4 merged); 2 s = 2 temporal groups, 4 s = 4
    write_video(media / "short.mp4", seconds=2.0, fps=4, size=112, with_audio=False)
    write_video(media / "long.mp4", seconds=4.0, fps=4, size=112, with_audio=False)
    processor = build_tiny_vl_processor(d / "processor")
    write_vl_config_json(d / "processor", tiny_vl_config(vision={"tokens_per_second": TPS}))
    data = tiny_vl_data_config(d / "processor", media, write_dataset(d / "rows.json", ROWS))
    data["dataset_param"]["preprocess_parameters"]["video_max_pixels"] = 112 * 112
    ds = OmniSFTDataset(load_data_config(data), seq_length=4096)
    return processor, [ds[i] for i in range(len(ds))]


def _vl_get_rope_index(processor, row) -> torch.Tensor:
    """transformers' Qwen2.5-VL ``get_rope_index`` called without building a model."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel as M

    ids = row["input_ids"][None]
    types = (ids == processor.image_token_id).int() + 2 * (ids == processor.video_token_id).int()  # the processor's
    fake = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(
        spatial_merge_size=processor.image_processor.merge_size, tokens_per_second=TPS)))
    fake.get_vision_position_ids = partial(M.get_vision_position_ids, fake)
    pos, _ = M.get_rope_index(fake, ids, types, image_grid_thw=row.get("image_grid_thw"),
                              video_grid_thw=row.get("video_grid_thw"),
                              second_per_grid_ts=row.get("video_second_per_grid"))
    return pos[:, 0]


def _original_rule(processor, row) -> torch.Tensor:
    """The original rule as transformers' Qwen2.5-Omni ``get_rope_index`` computes it (no audio in the row)."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
        Qwen2_5OmniPreTrainedModelForConditionalGeneration as M,
    )

    tok = processor.tokenizer
    cfg = SimpleNamespace(image_token_id=processor.image_token_id, video_token_id=processor.video_token_id,
                          audio_token_id=-1, vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
                          audio_start_token_id=-1, position_id_per_seconds=TPS, seconds_per_chunk=2)
    fake = SimpleNamespace(spatial_merge_size=processor.image_processor.merge_size, config=cfg)
    fake.get_llm_pos_ids_for_vision = partial(M.get_llm_pos_ids_for_vision, fake)
    ids = row["input_ids"][None]
    pos, _ = M.get_rope_index(fake, ids, row.get("image_grid_thw"), row.get("video_grid_thw"),
                              torch.ones_like(ids), False, None, row.get("video_second_per_grid"))
    return pos[:, 0]


def test_rows_hold_text_image_and_videos(encoded):
    processor, rows = encoded
    assert "pixel_values" not in rows[0] and "pixel_values_videos" not in rows[0]
    assert rows[1]["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert rows[2]["video_grid_thw"].tolist() == [[2, 8, 8]] and rows[3]["video_grid_thw"].tolist() == [[4, 8, 8]]
    assert rows[2]["video_second_per_grid"].tolist() == [1.0]  # temporal patch 2 / 2 fps
    for row in rows:  # every placeholder got its features
        assert int((row["input_ids"] == processor.video_token_id).sum()) == int(
            row["video_grid_thw"].prod() // 4 if "video_grid_thw" in row else 0)


@pytest.mark.parametrize("index", [0, 1, 2], ids=["text", "image", "short_video"])
def test_positions_equal_transformers_qwen2_5_vl(encoded, index):
    processor, rows = encoded
    row = rows[index]
    assert torch.equal(row["position_ids"], _vl_get_rope_index(processor, row))
    if index == 0:  # text only: plain 1D positions on every axis
        assert torch.equal(row["position_ids"], torch.arange(len(row["input_ids"])).expand(3, -1))


def test_long_video_follows_the_original_rule(encoded):
    processor, rows = encoded
    row = rows[3]
    ours = row["position_ids"]
    assert torch.equal(ours, _original_rule(processor, row))
    theirs = _vl_get_rope_index(processor, row)
    video = (row["input_ids"] == processor.video_token_id).nonzero()[:, 0]
    after = int(video.max()) + 1  # <|vision_end|>, then the text
    assert torch.equal(ours[:, :after], theirs[:, :after])  # the same up to the end of the video
    t, h, w = row["video_grid_thw"][0].tolist()
    span = int((t - 1) * TPS * float(row["video_second_per_grid"][0]))
    assert span >= max(h, w) // 2  # the case where the two rules part
    base = int(ours[1, video].min())  # the video's first position
    assert int(ours[0, after]) == base + span + 1  # one past the video's largest (temporal) position
    assert int(theirs[0, after]) == base + max(h, w) // 2
    assert torch.equal(ours[:, after:] - ours[0, after], theirs[:, after:] - theirs[0, after])  # then both count on
