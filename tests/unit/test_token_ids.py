"""Special token ids: omitted ones come from the tokenizer, stated ones must agree with it, none is defaulted."""

from __future__ import annotations

import json

import pytest

from mm_omni.config.model import SPECIAL_TOKEN_FIELDS
from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config
from tests.fixtures.qwen2_5_omni import tiny_data_config
from mm_omni.train import prepare_args
from tests.conftest import tiny_thinker_config

TINY_IDS = dict(image_token_id=1000, video_token_id=1001, audio_token_id=1002, vision_start_token_id=1003,
                vision_end_token_id=1004, audio_start_token_id=1005, audio_end_token_id=1006)


def _model_json(tmp_path, **top) -> str:
    data = json.loads(from_hf_thinker_config(tiny_thinker_config()).model_dump_json())
    for field in SPECIAL_TOKEN_FIELDS:
        data.pop(field)
    data.update(top)
    path = tmp_path / "model.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture(scope="module")
def data_json(tmp_path_factory):
    from tests.fixtures.qwen2_5_omni import build_tiny_processor

    d = tmp_path_factory.mktemp("ids")
    build_tiny_processor(d / "processor")
    path = d / "data.json"
    path.write_text(json.dumps(tiny_data_config(d / "processor", d, "rows.json")))
    return str(path)


def _start(model_json: str, data_json: str):
    return prepare_args(["--lr", "1e-5", "--train-iters", "1", "--mm-model", model_json, "--mm-data", data_json])[1]


def test_omitted_ids_come_from_the_tokenizer(tmp_path, data_json):
    cfg = _start(_model_json(tmp_path), data_json)
    assert {f: getattr(cfg, f) for f in SPECIAL_TOKEN_FIELDS} == TINY_IDS


def test_stated_id_that_disagrees_names_both_values(tmp_path, data_json):
    with pytest.raises(ValueError, match=r"model.json audio_token_id=151646 but the tokenizer .* gives 1002 for "
                                         r"the audio placeholder: remove audio_token_id"):
        _start(_model_json(tmp_path, audio_token_id=151646), data_json)


def test_stated_ids_that_agree_are_kept(tmp_path, data_json):
    cfg = _start(_model_json(tmp_path, vision_start_token_id=1003, img_context_token_id=1001), data_json)
    assert cfg.vision_start_token_id == 1003 and cfg.image_token_id == 1000


def test_img_context_marker_must_be_image_or_video(tmp_path, data_json):
    with pytest.raises(ValueError, match=r"img_context_token_id=151656 is neither the tokenizer's image placeholder id "
                                         r"1000 nor its video placeholder id 1001"):
        _start(_model_json(tmp_path, img_context_token_id=151656), data_json)


def test_model_without_ids_or_tokenizer_is_refused(tmp_path):
    from mm_omni.config.model import load_model_config
    from mm_omni.models.omni import OmniModel

    cfg = load_model_config(_model_json(tmp_path))
    with pytest.raises(ValueError, match=r"leaves image_token_id, video_token_id, audio_token_id unset"):
        OmniModel(cfg)


def test_hf_config_without_vision_start_leaves_it_to_the_tokenizer():
    cfg = tiny_thinker_config()
    del cfg.vision_start_token_id  # not a declared field of Qwen2_5OmniThinkerConfig: absent from released configs
    assert from_hf_thinker_config(cfg).vision_start_token_id is None
