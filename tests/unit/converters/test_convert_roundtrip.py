"""hf_to_mm -> mm_to_hf is bit-identical for every layout; shards hold what Megatron expects."""

from __future__ import annotations

import json

import pytest
import torch

from converters.common.convert import hf_state_to_mm
from converters.common.plan import Plan
from mm_omni.checkpoint import tp as tp_ops
from mm_omni.models.qwen2_5_omni.convert import SPEC
from tests.unit.converters.helpers import (assert_same_hf_dirs, assert_same_tensors, hf_to_mm, layout, load_hf,
                                           load_mm, mm_to_hf, resplit)

LAYOUTS = {
    "tp1_pp1": layout([[3]], [[4]], [[3]]),
    "tp2_pp2": layout([[1, 2]], [[4, 0]], [[3, 0]], tp=2),
    "vpp2": layout([[1, 1], [0, 1]], [[4, 0], [0, 0]], [[3, 0], [0, 0]]),
    "hetero_tp": layout([[3]], [[4]], [[3]], tp=2, vit_tp=1, audio_tp=1),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_round_trip_is_bit_identical(hf_dir, tmp_path, name):
    mm = hf_to_mm(hf_dir, tmp_path / "mm", LAYOUTS[name])
    assert (mm / "latest_checkpointed_iteration.txt").read_text() == "release"
    back = mm_to_hf(mm, hf_dir, tmp_path / "hf")
    assert_same_hf_dirs(hf_dir, back)


def test_tp2_pp2_files_hold_megatron_shards(hf_dir, tmp_path):
    from transformers import AutoConfig

    thinker = AutoConfig.from_pretrained(hf_dir).thinker_config
    full = hf_state_to_mm(SPEC, thinker, load_hf(hf_dir))
    split_kind = Plan(SPEC, thinker).split_kind
    files = load_mm(hf_to_mm(hf_dir, tmp_path / "mm", LAYOUTS["tp2_pp2"]))
    assert sorted(files) == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    assert all(f["checkpoint_version"] == 3.0 for f in files.values())
    s0, s1 = files["mp_rank_01_000"]["model"], files["mp_rank_01_001"]["model"]
    # stage 0: all encoders + embedding + text layer 0; stage 1: text layers 1-2 renumbered 0-1 + head
    assert "text_decoder.embedding.word_embeddings.weight" in s0 and "image_encoder.projector.layernorm.weight" in s0
    assert "audio_encoder.encoder.proj.weight" in s0 and "text_decoder.decoder.layers.1.input_layernorm.weight" not in s0
    assert sorted({k.split(".")[3] for k in s1 if k.startswith("text_decoder.decoder.layers.")}) == ["0", "1"]
    assert "text_decoder.output_layer.weight" in s1 and "text_decoder.decoder.final_layernorm.weight" in s1
    assert not any(k.startswith(("image_encoder.", "audio_encoder.")) for k in s1)
    for glob, loc, stage in (("text_decoder.decoder.layers.2.", "text_decoder.decoder.layers.1.", s1),
                             ("image_encoder.encoder.blocks.layers.3.", "image_encoder.encoder.blocks.layers.3.", s0),
                             ("audio_encoder.encoder.blocks.layers.0.", "audio_encoder.encoder.blocks.layers.0.", s0)):
        for leaf in ("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight", "mlp.linear_fc1.weight",
                     "mlp.linear_fc2.weight", "input_layernorm.weight"):
            name = glob + leaf
            assert torch.equal(stage[loc + leaf], tp_ops.shard(full[name], split_kind(name), 2, 1)), name
    gate, up = full["text_decoder.decoder.layers.0.mlp.linear_fc1.weight"].chunk(2)
    fc1_r1 = files["mp_rank_01_000"]["model"]["text_decoder.decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1_r1, torch.cat([gate.chunk(2)[1], up.chunk(2)[1]]))  # GLU split: [gate_r; up_r]
    assert fc1_r1.untyped_storage().nbytes() == fc1_r1.numel() * fc1_r1.element_size()  # no whole-storage views


def test_vpp_files_have_one_model_per_chunk(hf_dir, tmp_path):
    files = load_mm(hf_to_mm(hf_dir, tmp_path / "mm", LAYOUTS["vpp2"]))
    assert sorted(files) == ["mp_rank_00_000", "mp_rank_00_001"]
    first, last = files["mp_rank_00_000"], files["mp_rank_00_001"]
    assert {"model0", "model1", "checkpoint_version"} == set(first) == set(last)
    assert "text_decoder.embedding.word_embeddings.weight" in first["model0"]
    assert not first["model1"]  # (v1, p0) has no layers of any module
    assert "text_decoder.output_layer.weight" in last["model1"]
    assert "text_decoder.decoder.layers.0.input_layernorm.weight" in last["model1"]


def test_hetero_tp_replicates_smaller_modules(hf_dir, tmp_path):
    files = load_mm(hf_to_mm(hf_dir, tmp_path / "mm", LAYOUTS["hetero_tp"]))
    r0, r1 = files["mp_rank_00"]["model"], files["mp_rank_01"]["model"]
    for k in r0:
        if k.startswith(("image_encoder.", "audio_encoder.")):
            assert torch.equal(r0[k], r1[k]), k
    qkv = "text_decoder.decoder.layers.0.self_attention.linear_qkv.weight"
    assert r0[qkv].shape[0] * 2 == (4 + 2 * 2) * 16 and not torch.equal(r0[qkv], r1[qkv])
    model_json = json.loads((tmp_path / "mm" / "model.json").read_text())
    assert (model_json["text_decoder"]["tp"], model_json["image_encoder"]["tp"], model_json["audio_encoder"]["tp"]) \
        == (2, 1, 1)


@pytest.mark.parametrize("src,dst", [("tp2_pp2", "vpp2"), ("hetero_tp", "tp2_pp2"), ("vpp2", "tp1_pp1")])
def test_resplit_equals_direct_conversion(hf_dir, tmp_path, src, dst):
    a = hf_to_mm(hf_dir, tmp_path / "a", LAYOUTS[src])
    via = load_mm(resplit(a, tmp_path / "via", LAYOUTS[dst]))
    direct = load_mm(hf_to_mm(hf_dir, tmp_path / "direct", LAYOUTS[dst]))
    assert sorted(via) == sorted(direct)
    for rank in direct:
        for key in direct[rank]:
            if key.startswith("model"):
                assert_same_tensors(via[rank][key], direct[rank][key])
    assert (tmp_path / "via" / "model.json").read_text() == (tmp_path / "direct" / "model.json").read_text()


def test_training_iteration_dir_and_flat_layout(hf_dir, tmp_path):
    """A training save (iter_XXXXXXX, tracker = iteration) converts back; the seed's flat lists are accepted."""
    mm = hf_to_mm(hf_dir, tmp_path / "mm", LAYOUTS["tp2_pp2"])
    (mm / "release").rename(mm / "iter_0000100")
    (mm / "latest_checkpointed_iteration.txt").write_text("100")
    flat = layout([1, 2], [4, 0], [3, 0], tp=2)
    assert_same_hf_dirs(hf_dir, mm_to_hf(mm, hf_dir, tmp_path / "hf", flat))


def test_model_json_matches_layout(hf_dir, tmp_path):
    from mm_omni.config.model import load_model_config

    cfg = load_model_config(hf_to_mm(hf_dir, tmp_path / "mm", LAYOUTS["tp2_pp2"]) / "model.json")
    assert cfg.text_decoder.pipeline_num_layers == [1, 2] and cfg.text_decoder.tp == 2
    assert cfg.image_encoder.vision_encoder.pipeline_num_layers == [4, 0]
    assert cfg.audio_encoder.audio_encoder.pipeline_num_layers == [3, 0]
    assert cfg.text_decoder.num_layers == 3 and cfg.text_decoder.num_query_groups == 2


def test_dtype_option_casts_the_thinker_only(hf_dir, tmp_path):
    mm = hf_to_mm(hf_dir, tmp_path / "mm", LAYOUTS["tp1_pp1"], dtype="fp32")
    assert all(t.dtype == torch.float32 for t in load_mm(mm)["mp_rank_00"]["model"].values())
    back = load_hf(mm_to_hf(mm, hf_dir, tmp_path / "hf", dtype="bf16"))
    orig = load_hf(hf_dir)
    assert_same_tensors(back, orig)  # bf16 -> fp32 -> bf16 is exact; talker/token2wav untouched


def test_tied_embeddings_pp2(tied_hf_dir, tmp_path):
    mm = hf_to_mm(tied_hf_dir, tmp_path / "mm", LAYOUTS["tp2_pp2"])
    files = load_mm(mm)
    last, first = files["mp_rank_00_001"]["model"], files["mp_rank_00_000"]["model"]
    assert torch.equal(last["text_decoder.output_layer.weight"], first["text_decoder.embedding.word_embeddings.weight"])
    assert_same_hf_dirs(tied_hf_dir, mm_to_hf(mm, tied_hf_dir, tmp_path / "hf"))
