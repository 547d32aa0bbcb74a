"""data.json schema: MindSpeed-MM files load as-is; unknown keys and bad values name the fix."""

from __future__ import annotations

import json

import pytest

from mm_omni.config.data import load_data_config, resolve_cutoff_len


@pytest.mark.parametrize("name", ["data_7b.json", "data_3b.json"])
def test_examples_load(name):
    cfg = load_data_config(f"examples/qwen2.5omni/{name}")
    assert cfg.dataset_param.basic_parameters.template == "qwen2_omni"
    assert cfg.dataloader_param.sampler_type == "BaseRandomBatchSampler"


def test_mindspeed_shape_loads(tmp_path):
    raw = json.load(open("examples/qwen2.5omni/data_7b.json"))
    raw["dataset_param"]["attr"]["images"] = None  # MindSpeed-MM ships null here
    raw["dataset_param"]["basic_parameters"]["dataset"] = "./a.json,./b.json"
    cfg = load_data_config(raw)
    assert cfg.dataset_param.basic_parameters.dataset_files() == ["./a.json", "./b.json"]


def test_unknown_key_names_key_and_fix():
    raw = json.load(open("examples/qwen2.5omni/data_7b.json"))
    raw["dataset_param"]["preprocess_parameters"]["video_fsp"] = 2
    with pytest.raises(ValueError, match=r"unknown key 'dataset_param.preprocess_parameters.video_fsp'.*'video_fps'"):
        load_data_config(raw)


def test_bad_value_names_field_value_fix():
    raw = json.load(open("examples/qwen2.5omni/data_7b.json"))
    raw["dataset_param"]["preprocess_parameters"]["video_fps"] = -1
    with pytest.raises(ValueError, match=r"video_fps=-1: .*greater than 0"):
        load_data_config(raw)
    raw = json.load(open("examples/qwen2.5omni/data_7b.json"))
    raw["dataset_param"]["preprocess_parameters"]["image_min_pixels"] = 10**9
    with pytest.raises(ValueError, match="image_min_pixels=1000000000 is larger than image_max_pixels"):
        load_data_config(raw)
    raw = json.load(open("examples/qwen2.5omni/data_7b.json"))
    raw["dataset_param"]["basic_parameters"]["template"] = "qwen2_vl"
    with pytest.raises(ValueError, match=r"template='qwen2_vl'.*qwen2_omni"):
        load_data_config(raw)


def test_cutoff_len_rule():
    raw = json.load(open("examples/qwen2.5omni/data_7b.json"))
    assert resolve_cutoff_len(load_data_config(raw), 3072) == 3072
    raw["dataset_param"]["basic_parameters"]["cutoff_len"] = 512
    assert resolve_cutoff_len(load_data_config(raw), 3072) == 512
