"""Our encoded rows equal transformers' processor on the chat-template text, and positions equal
transformers' get_rope_index (with and without audio in video)."""

from __future__ import annotations

import re

import pytest
import torch

from mm_omni.config.data import load_data_config
from mm_omni.data.encode import RowEncoder
from mm_omni.data.formats import normalise_row
from mm_omni.data.media import load_audio, load_audio_track, load_image, load_video
from mm_omni.data.template import IGNORE_INDEX

from tests.fixtures.qwen2_5_omni import IMAGE_PIXELS, MIN_PIXELS, VIDEO_PIXELS, hf_rope_index, tiny_data_config as make_config

ROWS = {
    "image": {"messages": [{"role": "user", "content": "<image>What is in this image?"},
                           {"role": "assistant", "content": "A cat."}], "images": ["a.png"]},
    "audio": {"messages": [{"role": "user", "content": "<audio>What did the audio say?"},
                           {"role": "assistant", "content": "hello"}], "audios": ["long.wav"]},
    "video": {"messages": [{"role": "user", "content": "<video>What is she doing?"},
                           {"role": "assistant", "content": "Playing."}], "videos": ["v.mp4"]},
    "mixed": {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "<image><image>Compare these two pictures"},
                           {"role": "assistant", "content": "same"},
                           {"role": "user", "content": "<audio> and <video>?"},
                           {"role": "assistant", "content": "a dog"}],
              "images": ["a.png", "b.png"], "audios": ["a.wav"], "videos": ["v.mp4"]},
}
CASES = [("image", False), ("audio", False), ("video", False), ("video", True), ("mixed", False), ("mixed", True)]


def _hf_messages(row):
    out = []
    for m in row["messages"]:
        parts = [p for p in re.split(r"(<image>|<video>|<audio>)", m["content"]) if p]
        content = [{"type": p[1:-1]} if p in ("<image>", "<video>", "<audio>") else {"type": "text", "text": p}
                   for p in parts]
        out.append({"role": m["role"], "content": content})
    return out


def _reference(processor, row, media_dir, use_aiv):
    """Processor output computed the documented transformers way, independent of our template."""
    text = processor.apply_chat_template(_hf_messages(row), tokenize=False)
    images = [load_image(str(media_dir / p)) for p in row.get("images", [])]
    videos = [load_video(str(media_dir / p), 2.0, 128) for p in row.get("videos", [])]
    audio, slots = [], []
    vid = 0
    aud = 0
    for tag in re.findall(r"<image>|<video>|<audio>", "".join(m["content"] for m in row["messages"])):
        if tag == "<audio>":
            audio.append(load_audio(str(media_dir / row["audios"][aud])))
            slots.append(None)
            aud += 1
        elif tag == "<video>":
            if use_aiv:
                audio.append(load_audio_track(str(media_dir / row["videos"][vid])))
                slots.append(vid)
            vid += 1
    kwargs = dict(text=[text], return_tensors="pt")
    if images:
        kwargs.update(images=images, images_kwargs={"size": {"shortest_edge": MIN_PIXELS, "longest_edge": IMAGE_PIXELS}})
    if videos:
        kwargs.update(videos=[v.frames for v in videos],
                      videos_kwargs={"fps": videos[0].fps, "size": {"shortest_edge": MIN_PIXELS, "longest_edge": VIDEO_PIXELS}})
    if audio:
        kwargs["audio"] = audio
    if use_aiv:
        kwargs.update(load_audio_from_video=True, audio_from_video_indices=slots)
    return processor(**kwargs)


@pytest.mark.parametrize("name,use_aiv", CASES)
def test_row_matches_processor_and_rope(processor, processor_dir, media_dir, name, use_aiv):
    cfg = load_data_config(make_config(processor_dir, media_dir, "unused.json", use_audio_in_video=use_aiv))
    enc = RowEncoder(cfg, cutoff_len=4096, processor=processor)
    row = ROWS[name]
    ours = enc.encode(normalise_row(row, cfg.dataset_param.attr, str(media_dir), "d", 0))
    ref = _reference(processor, row, media_dir, use_aiv)

    assert torch.equal(ours["input_ids"], ref["input_ids"][0])
    has_video = "videos" in row
    assert ours["use_audio_in_video"] == (use_aiv and has_video)
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid"):
        assert (key in ours) == (key in ref), key
        if key in ref:
            assert torch.equal(torch.as_tensor(ours[key]), torch.as_tensor(ref[key])), key
    if "input_features" in ref:
        mask = ref["feature_attention_mask"]
        t = ours["input_features"].shape[-1]
        assert t == int(mask.sum(-1).max())
        assert torch.equal(ours["feature_attention_mask"], mask[:, :t])
        assert torch.equal(ours["input_features"], ref["input_features"][:, :, :t])
    if use_aiv and has_video:  # the interleaving really happened, over several chunks
        ids = ours["input_ids"].tolist()
        v0 = ids.index(enc.tokens.video)
        assert enc.tokens.audio in ids[v0:v0 + 20] and ids[v0 - 1] == enc.tokens.audio_bos

    # labels: each assistant content + <|im_end|>, nothing else
    targets = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
    lab = ours["labels"]
    tok = processor.tokenizer
    expected = "".join(t + "<|im_end|>" for t in targets)
    assert tok.decode(lab[lab != IGNORE_INDEX].tolist()) == expected
    assert torch.equal(lab[lab != IGNORE_INDEX], ours["input_ids"][lab != IGNORE_INDEX])

    ref_pos = hf_rope_index(
        enc.tokens, enc.rope, ref["input_ids"], image_grid_thw=ref.get("image_grid_thw"),
        video_grid_thw=ref.get("video_grid_thw"), second_per_grids=ref.get("video_second_per_grid"),
        audio_seqlens=ref["feature_attention_mask"].sum(-1) if "feature_attention_mask" in ref else None,
        use_audio_in_video=use_aiv and has_video,
    )
    assert torch.equal(ours["position_ids"], ref_pos[:, 0])


def test_train_on_prompt_and_mask_history(processor, processor_dir, media_dir):
    row = ROWS["mixed"]
    base = make_config(processor_dir, media_dir, "unused.json")
    cfg = load_data_config(base)
    conv = normalise_row(row, cfg.dataset_param.attr, str(media_dir), "d", 0)
    tok = processor.tokenizer

    base["dataset_param"]["basic_parameters"]["mask_history"] = True
    out = RowEncoder(load_data_config(base), 4096, processor=processor).encode(conv)
    assert tok.decode(out["labels"][out["labels"] != IGNORE_INDEX].tolist()) == "a dog<|im_end|>"

    base["dataset_param"]["basic_parameters"].update(mask_history=False, train_on_prompt=True)
    enc = RowEncoder(load_data_config(base), 4096, processor=processor)
    out = enc.encode(conv)
    ids, lab = out["input_ids"], out["labels"]
    placeholder = (ids == enc.tokens.image) | (ids == enc.tokens.video) | (ids == enc.tokens.audio)
    assert (lab[placeholder] == IGNORE_INDEX).all()
    assert torch.equal(lab[~placeholder], ids[~placeholder])


@pytest.mark.parametrize("stray,message", [
    (1000, r"image placeholder token \(id 1000\) at position 2 has no image: the row brings 0 image"),
    (1001, r"video placeholder token \(id 1001\) at position 2 has no video: the row brings 0 video"),
    (1002, r"audio placeholder token \(id 1002\) number 1 has no audio: the row brings 0 audio"),
])
def test_stray_placeholder_id_is_named(stray, message):
    """Token ids that reach the position code directly (not through the processor) with no media behind."""
    from mm_omni.models.rope_index import get_rope_index

    with pytest.raises(ValueError, match=message):
        get_rope_index([5, 6, stray, 7], image_token_id=1000, video_token_id=1001, audio_token_id=1002)
