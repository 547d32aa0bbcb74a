"""--cfg.test_convert_precision runs our model on the converted weights against transformers'."""

from __future__ import annotations

import torch

from tests.unit.converters.helpers import hf_to_mm, layout


def test_precision_check_passes_and_catches_a_bad_tensor(hf_dir, tmp_path):
    from transformers import AutoConfig

    from converters.qwen2_5_omni.precision import check_precision

    mm = hf_to_mm(hf_dir, tmp_path / "mm", layout([[1, 2]], [[4, 0]], [[3, 0]], tp=2), test_convert_precision=True)
    thinker = AutoConfig.from_pretrained(hf_dir).thinker_config
    assert check_precision(hf_dir, mm, thinker) < 1e-4
    path = mm / "release" / "mp_rank_01_001" / "model_optim_rng.pt"
    payload = torch.load(path, weights_only=True)
    payload["model"]["text_decoder.decoder.layers.0.mlp.linear_fc2.weight"].mul_(1.5)
    torch.save(payload, path)
    try:
        check_precision(hf_dir, mm, thinker)
    except AssertionError as err:
        assert "differ from transformers'" in str(err)
    else:
        raise AssertionError("a corrupted shard passed the precision check")
