"""Template ``qwen3_omni``: tokens, rendering, time constants, and ms-swift jsonl rows encoded end to end.

The reference of every encoded row is computed the documented transformers way, independent of our template:
the chat template's text, then ``Qwen3OmniMoeProcessor`` on the decoded media; positions are transformers'
``get_rope_index``. Collation, packing and context-parallel padding keep the float positions exactly.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from mm_omni.config.data import load_data_config
from mm_omni.data.collate import OmniCollator
from mm_omni.data.dataset import OmniSFTDataset
from mm_omni.data.formats import Conversation
from mm_omni.data.media import load_audio, load_audio_track, load_image, load_video
from mm_omni.data.template import IGNORE_INDEX
from mm_omni.models.qwen3_omni_moe.template import TEMPLATE
from mm_omni.parallel.context_parallel import pad_for_context_parallel

from tests.fixtures.media import write_image, write_video, write_wav
from tests.fixtures.qwen3_omni_moe import (
    IMAGE_PIXELS, MIN_PIXELS, TINY_QWEN3_OMNI_TOKEN_IDS, VIDEO_PIXELS, build_tiny_qwen3_omni_processor,
    hf_rope_index, tiny_data_config, write_thinker_config_json,
)

VIDEO_FPS = 3.0  # 2 frames per group at 3 fps: 2/3 s per group, 8.67 position ticks at 13 per second


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3_omni_template")
    media = d / "media"
    media.mkdir()
    write_image(media / "img.png", 64, 64, seed=0)
    write_wav(media / "a.wav", seconds=1.5)
    write_video(media / "v.mp4", seconds=2.0, fps=6, size=64, with_audio=True)
    processor = build_tiny_qwen3_omni_processor(d / "processor")
    write_thinker_config_json(d / "processor")
    return d, media, processor


def _swift_rows(media) -> list[dict]:
    """ms-swift's jsonl form: tags in the text, absolute media paths."""
    return [
        {"messages": [{"role": "user", "content": "<image><audio>Describe the image and the audio."},
                      {"role": "assistant", "content": "A cat and a tone."}],
         "images": [str(media / "img.png")], "audios": [str(media / "a.wav")]},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "<video>What is she doing?"},
                      {"role": "assistant", "content": "Playing."},
                      {"role": "user", "content": "<image><audio>And here?"},
                      {"role": "assistant", "content": "A cat."}],
         "images": [str(media / "img.png")], "audios": [str(media / "a.wav")], "videos": [str(media / "v.mp4")]},
        {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
    ]


def _hf_messages(row):
    out = []
    for m in row["messages"]:
        parts = [p for p in re.split(r"(<image>|<video>|<audio>)", m["content"]) if p]
        content = [{"type": p[1:-1]} if p in ("<image>", "<video>", "<audio>") else {"type": "text", "text": p}
                   for p in parts]
        out.append({"role": m["role"], "content": content})
    return out


def _reference(processor, row, use_aiv):
    """transformers' processor on the chat template's text and the decoded media (frames and waveforms)."""
    text = processor.apply_chat_template(_hf_messages(row), tokenize=False)
    images = [load_image(p) for p in row.get("images", [])]
    videos = [load_video(p, VIDEO_FPS, 128) for p in row.get("videos", [])]
    audio, slots, k = [], [], {"audio": 0, "video": 0}
    for tag in re.findall(r"<image>|<video>|<audio>", "".join(m["content"] for m in row["messages"])):
        if tag == "<audio>":
            audio.append(load_audio(row["audios"][k["audio"]]))
            slots.append(None)
            k["audio"] += 1
        elif tag == "<video>":
            if use_aiv:
                audio.append(load_audio_track(row["videos"][k["video"]]))
                slots.append(k["video"])
            k["video"] += 1
    kwargs = dict(text=[text], return_tensors="pt")
    if images:
        kwargs.update(images=images,
                      images_kwargs={"size": {"shortest_edge": MIN_PIXELS, "longest_edge": IMAGE_PIXELS}})
    if videos:  # the size explicitly: the processor's class default would override the video processor's
        kwargs.update(videos=[v.frames for v in videos], videos_kwargs={
            "fps": videos[0].fps, "size": {"shortest_edge": MIN_PIXELS, "longest_edge": VIDEO_PIXELS}})
    if audio:
        kwargs["audio"] = audio
    if use_aiv:
        kwargs.update(load_audio_from_video=True, audio_from_video_indices=slots)
    return text, processor(**kwargs)


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "audio_in_video"])
def encoded(setup, request):
    d, media, processor = setup
    rows = _swift_rows(media)
    path = d / f"swift_{request.param}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_data_config(d / "processor", media, str(path), video_fps=VIDEO_FPS, use_audio_in_video=request.param)
    ds = OmniSFTDataset(load_data_config(cfg), seq_length=4096)
    return request.param, rows, [ds[i] for i in range(len(ds))]


def test_special_tokens_and_model_ids(setup):
    _, _, processor = setup
    tokens = TEMPLATE.special_tokens(processor)
    assert TEMPLATE.model_token_ids(tokens) == TINY_QWEN3_OMNI_TOKEN_IDS
    assert (tokens.im_start, tokens.im_end, tokens.pad) == (1008, 1009, 1007)
    assert TEMPLATE.media_blocks(tokens) == {"image": "<|vision_start|><|image_pad|><|vision_end|>",
                                             "video": "<|vision_start|><|video_pad|><|vision_end|>",
                                             "audio": "<|audio_start|><|audio_pad|><|audio_end|>"}


def test_render_has_no_default_system_turn(setup):
    _, _, processor = setup
    tokens = TEMPLATE.special_tokens(processor)
    conv = Conversation(messages=[("user", "<audio>Hi"), ("assistant", "Hello")])
    text = TEMPLATE.render(conv, tokens)
    assert text == ("<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|>Hi<|im_end|>\n"
                    "<|im_start|>assistant\nHello<|im_end|>\n")
    assert [r for r, _ in TEMPLATE.turns(conv)] == ["user", "assistant"]
    named = TEMPLATE.render(conv, tokens, default_system="Be brief.")
    assert named.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert [r for r, _ in TEMPLATE.turns(conv, "Be brief.")] == ["system", "user", "assistant"]


def test_rope_params_from_config_json_or_processor(setup, tmp_path):
    d, _, processor = setup
    rope = TEMPLATE.rope_params(processor, str(d / "processor"))
    assert (rope.spatial_merge_size, rope.position_id_per_seconds, rope.n_window) == (2, 13.0, 50)
    assert TEMPLATE.rope_params(processor, str(tmp_path)).position_id_per_seconds == 13.0  # no config.json
    write_thinker_config_json(tmp_path, position_id_per_seconds=25)
    with pytest.raises(ValueError, match=r"position_id_per_seconds=25 .*processor has position_id_per_seconds=13"):
        TEMPLATE.rope_params(processor, str(tmp_path))
    write_thinker_config_json(tmp_path, n_window=100)
    with pytest.raises(ValueError, match=r"n_window=100 .*processor has n_window=50"):
        TEMPLATE.rope_params(processor, str(tmp_path))


def test_swift_jsonl_rows_match_processor_and_transformers(setup, encoded):
    d, _, processor = setup
    use_aiv, rows, ours = encoded
    tokens = TEMPLATE.special_tokens(processor)
    rope = TEMPLATE.rope_params(processor, str(d / "processor"))
    tok = processor.tokenizer
    for row, got in zip(rows, ours):
        text, ref = _reference(processor, row, use_aiv)
        conv = Conversation(messages=[(m["role"], m["content"]) for m in row["messages"]])
        assert TEMPLATE.render(conv, tokens) == text  # our turns are the chat template's
        assert torch.equal(got["input_ids"], ref["input_ids"][0])
        ids = got["input_ids"]
        # every placeholder count is the processor's: grids / merge^2, the processor's audio token counts
        n_img = int(ref["image_grid_thw"].prod(-1).sum()) // 4 if "image_grid_thw" in ref else 0
        n_vid = int(ref["video_grid_thw"].prod(-1).sum()) // 4 if "video_grid_thw" in ref else 0
        assert int((ids == tokens.image).sum()) == n_img and int((ids == tokens.video).sum()) == n_vid
        if "feature_attention_mask" in ref:
            from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import _get_feat_extract_output_lengths

            mel = ref["feature_attention_mask"].sum(-1)
            assert int((ids == tokens.audio).sum()) == int(_get_feat_extract_output_lengths(mel, 50).sum())
            t = got["input_features"].shape[-1]
            assert t == int(mel.max()) and torch.equal(got["input_features"], ref["input_features"][:, :, :t])
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid"):
            assert (key in got) == (key in ref), key
            if key in ref:
                assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(ref[key])), key
        assert got["use_audio_in_video"] == (use_aiv and "videos" in row)

        lab = got["labels"]
        expected = "".join(m["content"] + "<|im_end|>" for m in row["messages"] if m["role"] == "assistant")
        assert tok.decode(lab[lab != IGNORE_INDEX].tolist()) == expected

        mel = ref["feature_attention_mask"].sum(-1) if "feature_attention_mask" in ref else None
        theirs = hf_rope_index(tokens, rope, ref["input_ids"][0], ref.get("image_grid_thw"),
                               ref.get("video_grid_thw"), ref.get("video_second_per_grid"), mel,
                               use_audio_in_video=got["use_audio_in_video"])
        assert got["position_ids"].dtype == torch.float32
        assert torch.equal(got["position_ids"], theirs)
    video_pos = ours[1]["position_ids"]
    assert (video_pos != video_pos.round()).any()  # the video's fractional time ticks are there


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_float_positions_survive_collate_and_cp_padding(encoded, packing):
    _, _, rows = encoded
    batch = OmniCollator(pad_token_id=1007, packing=packing, pad_to_multiple_of=8, segment_multiple=1)(rows)
    assert batch["position_ids"].dtype == torch.float32
    padded = pad_for_context_parallel(batch, multiple=8, pad_id=1007)
    assert padded["position_ids"].dtype == torch.float32
    for b in (batch, padded):
        pos = b["position_ids"]
        if packing:
            cu = b["cu_seqlens"].tolist()
            parts = [pos[:, 0, cu[i]:cu[i] + len(r["input_ids"])] for i, r in enumerate(rows)]
        else:
            parts = [pos[:, i, :len(r["input_ids"])] for i, r in enumerate(rows)]
        for part, r in zip(parts, rows):
            assert torch.equal(part, r["position_ids"])


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_integer_positions_stay_int64(packing):
    """Templates with integer positions (Qwen2.5) keep int64 batches."""
    rows = [{"input_ids": torch.arange(n), "labels": torch.arange(n), "position_ids": torch.arange(n).expand(3, -1)}
            for n in (5, 3)]
    batch = OmniCollator(pad_token_id=0, packing=packing, pad_to_multiple_of=4)(rows)
    assert batch["position_ids"].dtype == torch.long
    assert pad_for_context_parallel(batch, multiple=8)["position_ids"].dtype == torch.long
