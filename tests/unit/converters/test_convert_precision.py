"""--cfg.test_convert_precision runs our model on the converted weights against transformers', per module."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.unit.converters.helpers import hf_to_mm, layout

CORRUPT = {
    "text decoder": ("text_decoder.decoder.layers.0.mlp.linear_fc2.weight", "logits"),
    "vision encoder": ("image_encoder.encoder.blocks.layers.0.mlp.linear_fc1.weight", "vision encoder"),
    "audio encoder": ("audio_encoder.encoder.blocks.layers.0.mlp.linear_fc1.weight", "audio encoder"),
}


def test_precision_check_passes_on_every_modality(sane_hf_dir, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="converters.common.precision"):
        mm = hf_to_mm(sane_hf_dir, tmp_path / "mm", layout([[1, 2]], [[4, 0]], [[3, 0]], tp=2),
                      test_convert_precision=True)
    assert mm.is_dir()
    for module in ("vision encoder (image + video)", "audio encoder", "logits (text + image + audio + video)"):
        assert any(f"test_convert_precision: {module} rel max error" in m for m in caplog.messages), module


@pytest.mark.parametrize("module", sorted(CORRUPT))
def test_precision_check_names_the_module_of_a_bad_tensor(sane_hf_dir, tmp_path, module):
    from transformers import AutoConfig

    from converters.common.plan import Plan
    from converters.common.precision import check_precision
    from mm_omni.models.qwen2_5_omni.convert import SPEC

    mm = hf_to_mm(sane_hf_dir, tmp_path / "mm", layout([[3]], [[4]], [[3]]))
    key, reported = CORRUPT[module]
    path = mm / "release" / "mp_rank_00" / "model_optim_rng.pt"
    payload = torch.load(path, weights_only=True)
    assert key in payload["model"], sorted(payload["model"])[:20]
    payload["model"][key].mul_(1.5)
    torch.save(payload, path)
    with pytest.raises(AssertionError, match=rf"differ from transformers': .*{reported}"):
        check_precision(Plan(SPEC, AutoConfig.from_pretrained(sane_hf_dir).thinker_config), sane_hf_dir, mm)


def test_probe_row_keeps_special_ids_out_of_the_text():
    """With special ids inside the range text ids are drawn from, only the media spans hold them."""
    from mm_omni.models.qwen2_5_omni.precision import probe_row
    from mm_omni.models.rope_index import audio_token_count
    from tests.conftest import tiny_thinker_config

    thinker = tiny_thinker_config(image_token_index=3, video_token_index=4, audio_token_index=5,
                                  vision_start_token_id=6, vision_end_token_id=7, audio_start_token_id=8,
                                  audio_end_token_id=9, text={"vocab_size": 16})
    row = probe_row(thinker, torch.Generator().manual_seed(0))
    ids = row["input_ids"][0].tolist()
    per_item = int(row["image_grid_thw"].prod()) // 4
    assert (ids.count(3), ids.count(4), ids.count(5)) == (per_item, per_item, audio_token_count(100))
    assert (ids.count(6), ids.count(7), ids.count(8), ids.count(9)) == (2, 2, 1, 1)
    assert row["position_ids"].shape == (3, 1, len(ids))
