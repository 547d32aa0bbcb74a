"""Every refusal happens before anything is written, and says which option, what value, what fix."""

from __future__ import annotations

import json
import shutil

import pytest
from pydantic import ValidationError

from converters.cli import main
from tests.unit.converters.helpers import hf_to_mm, layout, mm_to_hf

GOOD = layout([[1, 2]], [[4, 0]], [[3, 0]], tp=2)


@pytest.mark.parametrize("pc,message", [
    (layout([[1, 1]], [[4, 0]], [[3, 0]]), r"llm_pp_layers=\[\[1, 1\]\] sums to 2 but the text model has 3 layers"),
    (layout([[3]], [[3]], [[3]]), r"vit_pp_layers=\[\[3\]\] sums to 3 but the vision model has 4 layers"),
    (layout([[3]], [[4]], [[2]]), r"audio_pp_layers=\[\[2\]\] sums to 2 but the audio model has 3 layers"),
    (layout([[1, 2]], [[4]], [[3, 0]]), r"vit_pp_layers=\[\[4\]\] has chunk/stage lengths \[1\]"),
    (layout([[1, 2]], [[2, 2]], [[3, 0]]), r"vit_pp_layers=\[\[2, 2\]\] has layers on stage 1 but the text decoder "
                                            r"starts on stage 0"),
    (layout([[3]], [[4]], [[3]], tp=4), r"tp_size=4 does not divide text num_key_value_heads=2"),
    (layout([[3]], [[4]], [[3]], tp=2, vit_tp=4), r"vit_tp_size=4 does not divide vision num_heads=2"),
    (layout([[3]], [[4]], [[3]], tp=2, audio_tp=3), r"audio_tp_size=3 does not divide audio encoder_attention_heads"),
])
def test_bad_layouts(hf_dir, tmp_path, pc, message):
    with pytest.raises(ValueError, match=message):
        hf_to_mm(hf_dir, tmp_path / "mm", pc)
    assert not (tmp_path / "mm").exists() and not list(tmp_path.iterdir())


def test_not_an_omni_checkpoint(hf_dir, tmp_path):
    with pytest.raises(ValidationError, match="no such directory"):
        hf_to_mm(tmp_path / "nope", tmp_path / "mm", GOOD)
    other = tmp_path / "llama"
    shutil.copytree(hf_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValidationError, match="model_type='llama' is no registered model family"):
        hf_to_mm(other, tmp_path / "mm", GOOD)
    (other / "config.json").write_text(json.dumps(cfg))
    for f in other.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ValidationError, match=r"no \*.safetensors"):
        hf_to_mm(other, tmp_path / "mm", GOOD)


def test_weights_that_do_not_match_config_json(hf_dir, tmp_path):
    other = tmp_path / "mismatch"
    shutil.copytree(hf_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["thinker_config"]["text_config"]["num_hidden_layers"] = 2
    cfg["thinker_config"]["text_config"].pop("layer_types", None)
    cfg["thinker_config"]["vision_config"]["intermediate_size"] = 40
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unexpected tensor thinker\.model\.layers\.2\.(.|\n)*"
                                         r"shape \[44, 32\] but config.json implies \[40, 32\]"):
        hf_to_mm(other, tmp_path / "mm", layout([[2]], [[4]], [[3]]))
    assert not (tmp_path / "mm").exists()


def test_non_empty_output_needs_overwrite(hf_dir, tmp_path):
    out = tmp_path / "mm"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"mm_dir=.* is not empty; pass --cfg.overwrite true"):
        hf_to_mm(hf_dir, out, GOOD)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    hf_to_mm(hf_dir, out, GOOD, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "latest_checkpointed_iteration.txt").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["mm"]  # no temp or backup dirs left


def test_mm_to_hf_refusals(hf_dir, tmp_path):
    mm = hf_to_mm(hf_dir, tmp_path / "mm", GOOD)
    with pytest.raises(ValueError, match=r"different layout(.|\n)*llm_pp_layers: checkpoint \[\[1, 2\]\], "
                                         r"parallel_config \[\[2, 1\]\](.|\n)*tp_size: checkpoint 2, parallel_config 1"):
        mm_to_hf(mm, hf_dir, tmp_path / "hf", layout([2, 1], [4, 0], [3, 0]))
    with pytest.raises(ValueError, match="overlaps the input"):
        mm_to_hf(mm, hf_dir, hf_dir / "out", overwrite=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a Megatron checkpoint"):
        mm_to_hf(tmp_path / "empty", hf_dir, tmp_path / "hf2")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf2").exists()


def test_cli_seed_commands_and_help(hf_dir, tmp_path, capsys):
    common = ["--cfg.hf_config.hf_dir", str(hf_dir), "--cfg.parallel_config.vit_pp_layers", "[[4,0]]",
              "--cfg.parallel_config.audio_pp_layers", "[[3,0]]", "--cfg.parallel_config.tp_size", "1"]
    main(["Qwen2_5_OmniConverter", "hf_to_mm", "--cfg.mm_dir", str(tmp_path / "mm"),
          "--cfg.parallel_config.llm_pp_layers", "[[1,2]]", *common])
    main(["Qwen2_5_OmniConverter", "mm_to_hf", "--cfg.save_hf_dir", str(tmp_path / "hf"), "--cfg.mm_dir",
          str(tmp_path / "mm"), "--cfg.parallel_config.llm_pp_layers", "[1,2]", *common[:2],
          "--cfg.parallel_config.vit_pp_layers", "[4,0]", "--cfg.parallel_config.audio_pp_layers", "[3,0]"])
    main(["Qwen2_5_OmniConverter", "resplit", "--cfg.source_dir", str(tmp_path / "mm"), "--cfg.target_dir",
          str(tmp_path / "re"), "--cfg.target_parallel_config.llm_pp_layers", "[[3]]",
          "--cfg.target_parallel_config.vit_pp_layers", "[[4]]", "--cfg.target_parallel_config.audio_pp_layers",
          "[[3]]"])
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "re" / "release" / "mp_rank_00" / "model_optim_rng.pt").is_file()
    capsys.readouterr()
    for command in ("hf_to_mm", "mm_to_hf", "resplit"):
        with pytest.raises(SystemExit):
            main(["Qwen2_5_OmniConverter", command, "--help"])
    text = capsys.readouterr().out
    for option in ("mm_dir", "save_hf_dir", "hf_config.hf_dir", "llm_pp_layers", "vit_pp_layers", "audio_pp_layers",
                   "tp_size", "vit_tp_size", "audio_tp_size", "dtype", "overwrite", "test_convert_precision",
                   "source_dir", "target_dir", "target_parallel_config.llm_pp_layers"):
        assert f"--cfg.{option}" in text or f".{option}" in text, option


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_hf_shard_is_named(hf_dir, tmp_path):
    copy = tmp_path / "hf_copy"
    shutil.copytree(hf_dir, copy)
    shard = sorted(copy.glob("*.safetensors"))[0]
    _truncate(shard)
    with pytest.raises(RuntimeError, match=rf"{shard}: checkpoint file is damaged or truncated .*re-download or "
                                           r"re-convert"):
        hf_to_mm(copy, tmp_path / "mm", GOOD)
    assert not (tmp_path / "mm").exists()


def test_truncated_megatron_rank_file_is_named(hf_dir, tmp_path):
    mm = hf_to_mm(hf_dir, tmp_path / "mm", GOOD)
    rank_file = sorted(mm.glob("*/mp_rank_01_001/model_optim_rng.pt"))[0]
    _truncate(rank_file)
    with pytest.raises(RuntimeError, match=rf"{rank_file}: checkpoint file is damaged or truncated .*previous "
                                           r"iter_\* directory"):
        mm_to_hf(mm, hf_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
