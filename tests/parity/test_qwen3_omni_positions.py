"""Qwen3-Omni's M-RoPE positions from the data pipeline (template ``qwen3_omni``) against transformers.

Rows go through the real pipeline (tiny ``Qwen3OmniMoeProcessor``, PNG / WAV / MP4 files, the checkpoint's
config.json for ``position_id_per_seconds``) and their float positions must equal transformers' Qwen3-Omni
``get_rope_index`` exactly: text only, an image, two images, a video, an audio, a video with its audio
track, and mixed rows. Videos are sampled at 3 fps, so a frame group lasts 2/3 s and the time axis takes
fractional values (8.67 ticks per group at 13 ticks per second), which the text after it inherits.
"""

from __future__ import annotations

import pytest
import torch

from mm_omni.models.qwen3_omni_moe.rope_index import get_rope_index
from mm_omni.models.qwen3_omni_moe.template import TEMPLATE
from tests.fixtures.media import write_dataset, write_image, write_video, write_wav
from tests.fixtures.qwen3_omni_moe import (
    build_tiny_qwen3_omni_processor, hf_rope_index, tiny_data_config, write_thinker_config_json,
)

ROWS = {
    "text": {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
    "image": {"messages": [{"role": "user", "content": "<image>What is in this image?"},
                           {"role": "assistant", "content": "A cat."}], "images": ["a.png"]},
    "two_images": {"messages": [{"role": "user", "content": "<image>Compare these two pictures.<image>"},
                                {"role": "assistant", "content": "A dog, then a cat."}],
                   "images": ["a.png", "wide.png"]},
    "video": {"messages": [{"role": "user", "content": "<video>What is she doing?"},
                           {"role": "assistant", "content": "Playing with a ball."}], "videos": ["v.mp4"]},
    "audio": {"messages": [{"role": "user", "content": "<audio>What did the speaker say?"},
                           {"role": "assistant", "content": "hello"}], "audios": ["long.wav"]},
    "mixed": {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "<image>Describe the audio <audio> and the video <video>."},
                           {"role": "assistant", "content": "A cat."},
                           {"role": "user", "content": "<audio>And this?<image>"},
                           {"role": "assistant", "content": "hello"}],
              "images": ["a.png", "wide.png"], "audios": ["a.wav", "long.wav"], "videos": ["long.mp4"]},
}
PLAIN = list(ROWS)
IN_VIDEO = ["video", "mixed"]  # rows encoded again with use_audio_in_video


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from mm_omni.config.data import load_data_config
    from mm_omni.data.dataset import OmniSFTDataset

    d = tmp_path_factory.mktemp("qwen3_omni_positions")
    media = d / "media"
    media.mkdir()
    write_image(media / "a.png", 64, 64, seed=0)  # 4 x 4 patches: 4 tokens
    write_image(media / "wide.png", 128, 64, seed=1)
    write_wav(media / "a.wav", seconds=1.0)
    write_wav(media / "long.wav", seconds=2.5, sr=22050)  # resampled; past one 100-frame audio window
    write_video(media / "v.mp4", seconds=2.0, fps=6, size=64, with_audio=True)  # 6 frames at 3 fps: 3 groups
    write_video(media / "long.mp4", seconds=4.0, fps=6, size=64, with_audio=True)
    processor = build_tiny_qwen3_omni_processor(d / "processor")
    write_thinker_config_json(d / "processor")
    encoded = {}
    for aiv, names in ((False, PLAIN), (True, IN_VIDEO)):
        path = write_dataset(d / f"rows_{aiv}.json", [ROWS[n] for n in names])
        cfg = tiny_data_config(d / "processor", media, path, video_fps=3.0, use_audio_in_video=aiv)
        ds = OmniSFTDataset(load_data_config(cfg), seq_length=4096)
        encoded.update({(n, aiv): ds[i] for i, n in enumerate(names)})
    tokens = TEMPLATE.special_tokens(processor)
    rope = TEMPLATE.rope_params(processor, str(d / "processor"))
    return tokens, rope, encoded, processor


def _theirs(tokens, rope, row):
    mel = row["feature_attention_mask"].sum(-1) if "feature_attention_mask" in row else None
    return hf_rope_index(tokens, rope, row["input_ids"], row.get("image_grid_thw"), row.get("video_grid_thw"),
                         row.get("video_second_per_grid"), mel, use_audio_in_video=row["use_audio_in_video"])


CASES = [(n, False) for n in PLAIN] + [(n, True) for n in IN_VIDEO]


@pytest.mark.parametrize("name,aiv", CASES, ids=[f"{n}{'-audio_in_video' if a else ''}" for n, a in CASES])
def test_positions_equal_transformers(pipeline, name, aiv):
    tokens, rope, encoded, _ = pipeline
    row = encoded[(name, aiv)]
    ours = row["position_ids"]
    assert row["use_audio_in_video"] == (aiv and "videos" in ROWS[name])
    assert ours.dtype == torch.float32 and ours.shape == (3, len(row["input_ids"]))
    assert torch.equal(ours, _theirs(tokens, rope, row))
    if name == "text":  # plain 1D positions on every axis
        assert torch.equal(ours, torch.arange(len(row["input_ids"]), dtype=torch.float32).expand(3, -1))
    if "videos" in ROWS[name]:  # the fractional time ticks are exercised
        assert (ours != ours.round()).any()


def test_audio_in_video_rows_interleave(pipeline):
    tokens, _, encoded, _ = pipeline
    for name in IN_VIDEO:
        ids = encoded[(name, True)]["input_ids"].tolist()
        v0 = ids.index(tokens.video)
        assert ids[v0 - 2:v0] == [tokens.vision_bos, tokens.audio_bos]
        span = ids[v0:ids.index(tokens.audio_eos, v0)]
        # video, audio, video again: merged by time, not one block after the other
        first_audio = span.index(tokens.audio)
        assert tokens.video in span[first_audio:]


@pytest.mark.parametrize("pps", [25, 7.5])
def test_other_position_id_per_seconds(pipeline, pps):
    """Other tick rates (an int and a fraction) on rows whose token layout does not depend on it."""
    tokens, rope, encoded, _ = pipeline
    from dataclasses import replace

    other = replace(rope, position_id_per_seconds=pps)
    for name in ("video", "mixed"):
        row = encoded[(name, False)]
        mel = row["feature_attention_mask"].sum(-1) if "feature_attention_mask" in row else None
        ours = get_rope_index(
            row["input_ids"], image_token_id=tokens.image, video_token_id=tokens.video, audio_token_id=tokens.audio,
            vision_start_token_id=tokens.vision_bos, audio_start_token_id=tokens.audio_bos,
            image_grid_thw=row.get("image_grid_thw"), video_grid_thw=row.get("video_grid_thw"),
            video_second_per_grid=row.get("video_second_per_grid"), audio_seqlens=mel,
            spatial_merge_size=rope.spatial_merge_size, position_id_per_seconds=pps, n_window=rope.n_window)
        assert torch.equal(ours, _theirs(tokens, other, row))


def test_stray_media_is_an_error(pipeline):
    tokens, rope, encoded, _ = pipeline
    row = encoded[("image", False)]
    kw = dict(image_token_id=tokens.image, video_token_id=tokens.video, audio_token_id=tokens.audio,
              vision_start_token_id=tokens.vision_bos, audio_start_token_id=tokens.audio_bos)
    with pytest.raises(ValueError, match="image span number 1 of the row has no image"):
        get_rope_index(row["input_ids"], **kw)
    with pytest.raises(ValueError, match="does not hold the 16 placeholder tokens"):
        get_rope_index(row["input_ids"], image_grid_thw=torch.tensor([[1, 8, 8]]), **kw)


def test_audio_track_shorter_than_video(pipeline):
    """A one-group video whose merged rows/columns reach past its short audio: the span ends on the audio,
    below the span's largest position, and the end markers continue from that last piece (transformers' rule),
    not from the largest position of the span."""
    tokens, rope, _, processor = pipeline
    frames = torch.randint(0, 255, (2, 128, 128, 3), dtype=torch.uint8).numpy()  # 1 group of 4 x 4 tokens
    audio = (0.3 * torch.sin(torch.arange(1600) / 7.0)).numpy()  # 0.1 s: 2 audio tokens
    text = ("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What is she doing?<|im_end|>\n"
            "<|im_start|>assistant\nPlaying.<|im_end|>\n")
    out = processor(text=[text], videos=[frames], audio=[audio], load_audio_from_video=True,
                    audio_from_video_indices=[0], return_tensors="pt",
                    videos_kwargs={"fps": 3.0, "size": {"shortest_edge": 32 * 32, "longest_edge": 128 * 128}})
    row = {k: v for k, v in out.items()}
    row["input_ids"] = row["input_ids"][0]
    ours = TEMPLATE.positions(row["input_ids"].numpy(), row, True, tokens, rope)
    row["use_audio_in_video"] = True
    assert torch.equal(ours, _theirs(tokens, rope, row))
    ids = row["input_ids"]
    end = int(torch.nonzero(ids == tokens.audio_eos)[0])
    assert int(ids[end - 1]) == tokens.audio  # the span ends on audio ...
    assert ours[:, end].max() < ours[:, :end].max() + 1  # ... below the span's largest position
