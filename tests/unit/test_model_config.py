"""model.json schema: MindSpeed-MM's files load as-is; mistakes fail with field, value and fix."""

import json
from pathlib import Path

import pytest

from mm_omni.config.model import load_model_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "qwen2.5omni"


def _write(tmp_path, data):
    path = tmp_path / "model.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def model_7b():
    return json.loads((EXAMPLES / "model_7b.json").read_text())


def test_7b_and_3b_load_with_real_architecture():
    cfg7 = load_model_config(EXAMPLES / "model_7b.json")
    assert (cfg7.text_decoder.num_layers, cfg7.text_decoder.hidden_size, cfg7.text_decoder.num_query_groups) == (28, 3584, 4)
    assert cfg7.image_encoder.vision_encoder.hidden_size == 1280  # not transformers' 3584 default
    assert cfg7.image_encoder.vision_encoder.fullatt_block_indexes == [7, 15, 23, 31]
    assert cfg7.audio_encoder.audio_encoder.num_attention_heads == 20
    cfg3 = load_model_config(EXAMPLES / "model_3b.json")
    assert (cfg3.text_decoder.num_layers, cfg3.text_decoder.hidden_size, cfg3.text_decoder.vocab_size) == (36, 2048, 151936)
    assert cfg3.image_encoder.vision_projector.hidden_size == 2048
    assert cfg3.audio_encoder.audio_encoder.output_dim == 2048


def test_unknown_key_is_named(tmp_path, model_7b):
    model_7b["text_decoder"]["num_layer"] = 28
    with pytest.raises(ValueError, match=r"text_decoder\.num_layer"):
        load_model_config(_write(tmp_path, model_7b))


def test_layer_split_that_does_not_sum(tmp_path, model_7b):
    model_7b["text_decoder"]["pipeline_num_layers"] = [11, 16]
    with pytest.raises(ValueError, match=r"sums to 27 but num_layers is 28"):
        load_model_config(_write(tmp_path, model_7b))


def test_encoder_must_finish_before_decoder_starts(tmp_path, model_7b):
    model_7b["image_encoder"]["vision_encoder"]["pipeline_num_layers"] = [30, 2, 0, 0]
    model_7b["audio_encoder"]["audio_encoder"]["pipeline_num_layers"] = [32, 0, 0, 0]
    model_7b["text_decoder"]["pipeline_num_layers"] = [1, 10, 10, 7]
    with pytest.raises(ValueError, match=r"image_encoder\.vision_encoder.*still has layers on stage 1"):
        load_model_config(_write(tmp_path, model_7b))


def test_stage_count_mismatch(tmp_path, model_7b):
    model_7b["text_decoder"]["pipeline_num_layers"] = [1, 10, 10, 7]
    with pytest.raises(ValueError, match=r"different number of stages"):
        load_model_config(_write(tmp_path, model_7b))


def test_vpp_nested_lists(tmp_path, model_7b):
    model_7b["image_encoder"]["vision_encoder"]["pipeline_num_layers"] = [[32, 0], [0, 0]]
    model_7b["audio_encoder"]["audio_encoder"]["pipeline_num_layers"] = [[32, 0], [0, 0]]
    model_7b["text_decoder"]["pipeline_num_layers"] = [[0, 7], [7, 14]]
    cfg = load_model_config(_write(tmp_path, model_7b))
    assert cfg.text_decoder.stage_layers() == [[0, 7], [7, 14]]


def test_missing_file_names_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--mm-model"):
        load_model_config(tmp_path / "nope.json")


def test_from_hf_thinker_config_roundtrips_sizes(thinker_config):
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config

    cfg = from_hf_thinker_config(thinker_config)
    assert cfg.text_decoder.num_query_groups == thinker_config.text_config.num_key_value_heads
    assert cfg.text_decoder.mrope_section == [2, 3, 3]
    assert cfg.image_encoder.vision_encoder.fullatt_block_indexes == [1, 3]
    assert cfg.audio_encoder.audio_encoder.n_window == 8
    assert cfg.audio_token_id == thinker_config.audio_token_index


@pytest.mark.parametrize("thinker_tied,text_tied", [(False, True), (True, False), (False, False)])
def test_output_layer_tying_follows_the_thinker_flag(thinker_tied, text_tied):
    """transformers ties lm_head by the thinker config's flag; text_config's (default True) is ignored."""
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config
    from tests.conftest import tiny_thinker_config

    cfg = tiny_thinker_config(text={"tie_word_embeddings": text_tied}, tie_word_embeddings=thinker_tied)
    assert from_hf_thinker_config(cfg).text_decoder.untie_embeddings_and_output_weights is (not thinker_tied)


def test_configs_tiny_is_the_test_model():
    """configs/tiny/model.json is the model.json of the tiny thinker the tests build."""
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config
    from tests.conftest import tiny_thinker_config

    path = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "model.json"
    expected = from_hf_thinker_config(tiny_thinker_config()).model_dump(mode="json", exclude_none=True)
    assert json.loads(path.read_text()) == expected
    assert load_model_config(path).text_decoder.num_layers == 3


@pytest.mark.parametrize("size", ["7b", "3b"])
def test_configs_link_the_example_files(size):
    root = Path(__file__).resolve().parents[2]
    for name in ("model", "data"):
        assert (root / f"configs/qwen2_5_omni_{size}/{name}.json").resolve() == \
            (root / f"examples/qwen2.5omni/{name}_{size}.json").resolve()
    assert load_model_config(root / f"configs/qwen2_5_omni_{size}/model.json")


@pytest.mark.parametrize("module,key,value,message", [
    ("text", "activation_func", "relu", r"activation_func\n  Input should be 'silu', 'gelu', 'gelu_tanh'"),
    ("projector", "bias_activation_fusion", True,
     r"bias_activation_fusion=true with activation_func='gelu'.*not supported"),
    ("text", "rope_scaling", {"type": "yarn", "factor": 4.0}, r"rope_scaling=.*type 'yarn' not supported"),
    ("text", "rope_scaling", {"type": "mrope", "factor": 4.0}, r"keys \['factor'\] not supported"),
    ("text", "rope_scaling", {"type": "mrope", "mrope_section": [16, 16, 32]},
     r"rope_scaling.mrope_section=\[16, 16, 32\] but mrope_section=\[16, 24, 24\]"),
    ("text", "mrope_section", [16, 24, 16], r"sums to 56 but head_dim / 2 is 64"),
    ("text", "pad_token_id", 152064, r"pad_token_id=152064 is outside the vocabulary \[0, 152064\)"),
    ("audio", "scale_embedding", True, r"scale_embedding=true: not supported"),
    ("text", "attention_dropout", 1.5, r"attention_dropout\n  Input should be less than or equal to 1"),
])
def test_unsupported_model_json_values_are_named(tmp_path, model_7b, module, key, value, message):
    """What model.json states but the models do not implement fails at load, naming the field."""
    where = {"text": model_7b["text_decoder"], "audio": model_7b["audio_encoder"]["audio_encoder"],
             "projector": model_7b["image_encoder"]["vision_projector"]}[module]
    where[key] = value
    with pytest.raises(ValueError, match=message):
        load_model_config(_write(tmp_path, model_7b))


def test_supported_model_json_values_load(tmp_path, model_7b):
    model_7b["text_decoder"].update(activation_func="gelu_tanh", pad_token_id=151643,
                                    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    model_7b["image_encoder"]["vision_encoder"]["bias_activation_fusion"] = True  # gated silu: fusable
    cfg = load_model_config(_write(tmp_path, model_7b))
    assert (cfg.text_decoder.activation_func, cfg.text_decoder.pad_token_id) == ("gelu_tanh", 151643)
