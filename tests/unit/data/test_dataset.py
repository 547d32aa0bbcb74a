"""Formats, bad rows, truncation, cache and the DataLoader end to end."""

from __future__ import annotations

import logging

import pytest
import torch

from mm_omni.config.data import load_data_config
from mm_omni.data import build_dataloader
from mm_omni.data.dataset import OmniSFTDataset
from mm_omni.data.encode import RowEncoder
from mm_omni.data.template import IGNORE_INDEX
from tests.fixtures.qwen2_5_omni import tiny_data_config
from tests.fixtures.media import write_dataset

GOOD = {"messages": [{"role": "user", "content": "<image>What is in this image?"},
                     {"role": "assistant", "content": "A cat."}], "images": ["a.png"]}


def _dataset(processor, processor_dir, media_dir, tmp_path, rows, name="d.json", **basic):
    path = write_dataset(tmp_path / name, rows, jsonl=name.endswith(".jsonl"))
    cfg = load_data_config(tiny_data_config(processor_dir, media_dir, path, **basic))
    return OmniSFTDataset(cfg, seq_length=4096, processor=processor)


def test_formats_and_relative_paths(processor, processor_dir, media_dir, tmp_path):
    swift = {"messages": [{"role": "user", "content": "<audio>Transcribe"}, {"role": "assistant", "content": "hi"}],
             "audios": ["a.wav"]}
    llava = {"id": 1, "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nDescribe"},
                                                         {"from": "gpt", "value": "ok"}]}
    text = {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}
    ds = _dataset(processor, processor_dir, media_dir, tmp_path, [swift, llava, text], name="mix.jsonl")
    assert len(ds) == 3
    tok = processor.tokenizer
    for row, target in zip(ds, ["hi", "ok", "4"]):
        assert tok.decode(row["labels"][row["labels"] != IGNORE_INDEX].tolist()) == target + "<|im_end|>"
    assert "input_features" in ds[0] and "pixel_values" in ds[1] and "pixel_values" not in ds[2]


BAD = [
    ({"messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}],
      "images": ["nope.png"]}, r"row 1: image file not found \(file: .*nope.png\)"),
    ({"messages": [{"role": "user", "content": "<image>x"}, {"role": "assistant", "content": "y"}],
      "images": ["broken.png"]}, r"row 1: unreadable media: cannot read image .*broken.png"),
    ({"messages": [{"role": "user", "content": "<image><image>x"}, {"role": "assistant", "content": "y"}],
      "images": ["a.png"]}, r"row 1: 2 <image> tag\(s\) but 1 image file\(s\) \(file: .*a.png\)"),
    ({"messages": [{"role": "assistant", "content": "y"}, {"role": "user", "content": "x"}]},
     r"row 1: roles \['assistant', 'user'\]: turn 0 is 'assistant', expected 'user'"),
    ({"messages": [{"role": "user", "content": "x"}]}, r"row 1: roles \['user'\]: need user/assistant pairs"),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
     r"row 1: unsupported role 'robot'"),
    # a placeholder token typed into the text, with no media behind it
    ({"messages": [{"role": "user", "content": "look: <|IMAGE|>"}, {"role": "assistant", "content": "y"}]},
     r"row 1: processor rejected the row: Found 1 <\|IMAGE\|> tokens in the text but no images"),
    ({"messages": [{"role": "user", "content": "hear: <|AUDIO|>"}, {"role": "assistant", "content": "y"}]},
     r"row 1: processor rejected the row: .*<\|AUDIO\|>"),
]


@pytest.mark.parametrize("bad,message", BAD)
def test_bad_rows_name_dataset_row_and_file(processor, processor_dir, media_dir, tmp_path, bad, message):
    with pytest.raises(ValueError, match=r"dataset '.*bad.json' " + message):
        _dataset(processor, processor_dir, media_dir, tmp_path, [GOOD, bad], name="bad.json")


def test_skip_bad_rows_counts(processor, processor_dir, media_dir, tmp_path, caplog):
    rows = [GOOD] + [b for b, _ in BAD]
    with caplog.at_level(logging.WARNING):
        ds = _dataset(processor, processor_dir, media_dir, tmp_path, rows, on_bad_sample="skip")
    assert len(ds) == 1 and ds.stats["skipped_bad"] == len(BAD)
    assert "nope.png" in caplog.text


def test_truncation_never_cuts_media(processor, processor_dir, media_dir, tmp_path, caplog):
    long_answer = {"messages": [{"role": "user", "content": "<image>Describe"},
                                {"role": "assistant", "content": "the quick brown fox " * 20}], "images": ["a.png"]}
    media_late = {"messages": [{"role": "user", "content": "hello " * 40 + "<image>"},
                               {"role": "assistant", "content": "ok"}], "images": ["a.png"]}
    with caplog.at_level(logging.WARNING):
        ds = _dataset(processor, processor_dir, media_dir, tmp_path, [long_answer, media_late], cutoff_len=48)
    assert ds.stats == {"kept": 1, "truncated": 1, "dropped_too_long": 1}
    assert "row 1" in caplog.text and "split a media span" in caplog.text
    row = ds[0]
    assert len(row["input_ids"]) == 48 and (row["labels"] != IGNORE_INDEX).any()
    assert row["position_ids"].shape == (3, 48)


def test_cache_hit_skips_preprocessing(processor, processor_dir, media_dir, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    first = _dataset(processor, processor_dir, media_dir, tmp_path, [GOOD, GOOD], cache_dir=cache)
    calls = []
    monkeypatch.setattr(RowEncoder, "encode", lambda self, conv: calls.append(conv) or {"input_ids": [0] * 5})
    second = _dataset(processor, processor_dir, media_dir, tmp_path, [GOOD, GOOD], cache_dir=cache)
    assert calls == [] and second.rows == first.rows
    # a different config is a different key
    _dataset(processor, processor_dir, media_dir, tmp_path, [GOOD, GOOD], cache_dir=cache, train_on_prompt=True)
    assert len(calls) == 2


def test_dataloader_end_to_end(processor, processor_dir, media_dir, tmp_path):
    audio = {"messages": [{"role": "user", "content": "<audio>Transcribe"}, {"role": "assistant", "content": "hi"}],
             "audios": ["a.wav"]}
    path = write_dataset(tmp_path / "e2e.json", [GOOD, audio, GOOD])
    cfg = load_data_config(tiny_data_config(processor_dir, media_dir, path, dataloader={"pin_memory": False}))
    loader = build_dataloader(cfg, micro_batch_size=2, seq_length=4096, processor=processor)
    batch = next(iter(loader))
    b, s = batch["input_ids"].shape
    assert b == 2 and s % 8 == 0
    assert batch["position_ids"].shape == (3, 2, s)
    assert batch["use_audio_in_video"].tolist() == [False, False]
    assert batch["input_features"].shape[:2] == (1, 128) and batch["image_grid_thw"].shape == (1, 3)
    assert batch["labels"].dtype == torch.long


def test_parallel_preprocessing_matches_serial(processor, processor_dir, media_dir, tmp_path):
    rows = [GOOD, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 2
    serial = _dataset(processor, processor_dir, media_dir, tmp_path, rows)
    parallel = _dataset(processor, processor_dir, media_dir, tmp_path, rows, preprocessing_num_workers=2)
    assert parallel.rows == serial.rows and parallel.stats == serial.stats
