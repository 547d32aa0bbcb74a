"""Qwen2.5-VL's registry entry and data template: every piece it names loads, model.json / data.json / HF
model_type select it, its template reads the special tokens and the video time scale from the checkpoint (never
constants), and its rows carry what the model needs."""

from __future__ import annotations

import json

import pytest
import torch

from tests.fixtures.qwen2_5_vl import (QWEN_VL_SPECIAL_TOKENS, TINY_VL_SPECIAL_TOKENS, build_tiny_vl_processor,
                                       tiny_vl_config, tiny_vl_data_config, write_vl_config_json)


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vl_processor")
    build_tiny_vl_processor(d)
    return d


def test_every_ref_loads_and_the_keys_select_the_family():
    from mm_omni.registry import by_name, for_hf_model_type, for_model_json, for_template

    fam = by_name("qwen2_5_vl")
    for ref in ("model_config", "config_from_hf", "task", "template", "converter", "flops"):
        assert fam.load(ref) is not None, ref
    assert fam.load("converter").__name__ == fam.converter == "Qwen2_5_VLConverter"
    assert for_template("qwen2vl") is fam and for_hf_model_type("qwen2_5_vl") is fam
    assert for_model_json({"model_id": "qwen2_5vl", "text_decoder": {"model_id": "qwen2_5_lm"}}) is fam
    # the top-level id alone is shared with Qwen2.5-Omni: the decoder's id tells them apart
    assert for_model_json({"model_id": "qwen2_5vl", "text_decoder": {"model_id": "qwen2_5_omni_thinker"}}).name \
        == "qwen2_5_omni"
    assert fam.load("template").media == fam.modalities == ("image", "video")


def test_flops_count_a_batch_without_audio():
    from mm_omni.models.qwen2_5_vl.hf_config import config_from_hf
    from mm_omni.registry import by_name

    flops = by_name("qwen2_5_vl").load("flops")
    cfg = config_from_hf(tiny_vl_config())
    text_only = {"input_ids": torch.zeros(1, 32, dtype=torch.long)}
    with_image = dict(text_only, image_grid_thw=torch.tensor([[1, 4, 4]]))
    assert 0 < flops(cfg, text_only) < flops(cfg, with_image)


@pytest.mark.parametrize("special", [TINY_VL_SPECIAL_TOKENS, QWEN_VL_SPECIAL_TOKENS], ids=["tiny", "released"])
def test_special_tokens_come_from_the_tokenizer(tmp_path, special):
    from mm_omni.models.qwen2_5_vl.template import TEMPLATE

    tokens = TEMPLATE.special_tokens(build_tiny_vl_processor(tmp_path, special_tokens=special))
    assert (tokens.image, tokens.video, tokens.vision_bos, tokens.vision_eos) == tuple(
        special[t] for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"))
    assert (tokens.im_start, tokens.im_end, tokens.pad) == tuple(
        special[t] for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    assert tokens.audio is None and tokens.placeholders() == [tokens.image, tokens.video]
    assert TEMPLATE.model_token_ids(tokens) == {
        "image_token_id": tokens.image, "video_token_id": tokens.video,
        "vision_start_token_id": tokens.vision_bos, "vision_end_token_id": tokens.vision_eos}
    blocks = TEMPLATE.media_blocks(tokens)
    assert blocks == {"image": "<|vision_start|><|image_pad|><|vision_end|>",
                      "video": "<|vision_start|><|video_pad|><|vision_end|>"}


def test_a_tokenizer_without_the_tokens_is_named(tmp_path):
    from mm_omni.models.qwen2_5_vl.template import TEMPLATE

    special = {k: v for k, v in TINY_VL_SPECIAL_TOKENS.items() if k != "<|vision_start|>"}
    with pytest.raises(ValueError, match=r"lacks special tokens \['<\|vision_start\|>'\]"):
        TEMPLATE.special_tokens(build_tiny_vl_processor(tmp_path, special_tokens=special))


def test_video_time_scale_is_the_checkpoints(processor_dir, tmp_path):
    from mm_omni.models.qwen2_5_vl.template import TEMPLATE

    processor = TEMPLATE.load_processor(str(processor_dir))
    assert TEMPLATE.rope_params(processor, str(processor_dir)).position_id_per_seconds == 2  # no config.json
    d = tmp_path / "ckpt"
    d.mkdir()
    write_vl_config_json(d, tiny_vl_config(vision={"tokens_per_second": 3}))
    rope = TEMPLATE.rope_params(processor, str(d))
    assert (rope.position_id_per_seconds, rope.spatial_merge_size) == (3, 2)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["vision_config"]["tokens_per_second"]  # omitted: transformers' class default, as transformers reads it
    (d / "config.json").write_text(json.dumps(cfg))
    from transformers import Qwen2_5_VLVisionConfig

    assert TEMPLATE.rope_params(processor, str(d)).position_id_per_seconds == Qwen2_5_VLVisionConfig().tokens_per_second


def test_rows_and_refusals(processor_dir, tmp_path):
    """A row renders in ChatML with the VL media block; audio and audio-in-video are refused by name."""
    from mm_omni.config.data import load_data_config
    from mm_omni.data.dataset import OmniSFTDataset
    from mm_omni.data.formats import BadSampleError
    from tests.fixtures.media import write_dataset, write_image, write_wav

    write_image(tmp_path / "a.png")
    write_wav(tmp_path / "a.wav")
    rows = [{"messages": [{"role": "user", "content": "<image>What is in this image?"},
                          {"role": "assistant", "content": "A cat."}], "images": ["a.png"]}]
    ds = OmniSFTDataset(load_data_config(tiny_vl_data_config(processor_dir, tmp_path,
                                                             write_dataset(tmp_path / "r.json", rows))), 4096)
    row = ds[0]
    ids = row["input_ids"].tolist()
    s = TINY_VL_SPECIAL_TOKENS
    start = ids.index(s["<|vision_start|>"])
    assert ids[start + 1:start + 5] == [s["<|image_pad|>"]] * 4 and ids[start + 5] == s["<|vision_end|>"]
    assert row["pixel_values"].shape[0] == 16 and row["position_ids"].shape == (3, len(ids))
    audio = [{"messages": [{"role": "user", "content": "<audio>Transcribe"}, {"role": "assistant", "content": "hi"}],
              "audios": ["a.wav"]}]
    data = tiny_vl_data_config(processor_dir, tmp_path, write_dataset(tmp_path / "a.json", audio))
    data["dataset_param"]["attr"]["audios"] = "audios"
    with pytest.raises((BadSampleError, ValueError), match=r"template 'qwen2vl' reads no audio"):
        OmniSFTDataset(load_data_config(data), 4096)
    data["dataset_param"]["preprocess_parameters"]["use_audio_in_video"] = True
    with pytest.raises(ValueError, match=r"use_audio_in_video=true but template 'qwen2vl' reads no audio"):
        OmniSFTDataset(load_data_config(data), 4096)
