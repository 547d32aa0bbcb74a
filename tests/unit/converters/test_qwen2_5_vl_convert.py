"""``mm-convert Qwen2_5_VLConverter``: hf_to_mm -> mm_to_hf bit-identical for both HF spellings and every layout
(TP2, PP2, per-module TP, tied output layer), resplit equals direct conversion, the Megatron files and model.json
are what training loads, the precision check passes, and a checkpoint changed on the Megatron side exports to a
transformers model with our model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from converters.config import HfToMmConfig, MmToHfConfig, ResplitConfig
from tests.fixtures.qwen2_5_vl import tiny_vl_config
from tests.helpers import init_megatron, rel_err

LAYOUTS = {
    "tp1": dict(llm_pp_layers=[[3]], vit_pp_layers=[[4]], tp_size=1),
    "tp2_pp2": dict(llm_pp_layers=[[1, 2]], vit_pp_layers=[[4, 0]], tp_size=2),
    "vit_tp1": dict(llm_pp_layers=[[3]], vit_pp_layers=[[4]], tp_size=2, vit_tp_size=1),
}


def converter():
    from mm_omni.registry import by_name

    return by_name("qwen2_5_vl").load("converter")


def hf_to_mm(hf_dir: Path, mm_dir: Path, pc: dict, **kw) -> Path:
    converter().hf_to_mm(HfToMmConfig(mm_dir=mm_dir, hf_config={"hf_dir": hf_dir}, parallel_config=pc, **kw))
    return mm_dir


def mm_to_hf(mm_dir: Path, hf_dir: Path, out: Path, **kw) -> Path:
    converter().mm_to_hf(MmToHfConfig(mm_dir=mm_dir, hf_config={"hf_dir": hf_dir}, save_hf_dir=out, **kw))
    return out


def load_hf(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def load_mm(mm_dir: Path) -> dict[str, dict]:
    return {p.parent.name: torch.load(p, weights_only=True) for p in sorted((mm_dir / "release").glob("*/*.pt"))}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:10]
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def assert_same_hf_dirs(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for f in a.glob("*.safetensors"):
        assert_same_tensors(load_file(f), load_file(b / f.name))
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()


def make_checkpoint(path: Path, seed: int = 0, perturb: float | None = None, spelling: str = "hub",
                    **overrides) -> Path:
    """A random tiny Qwen2.5-VL: ``save_pretrained`` (bf16, sharded; transformers 5.24 writes the Hub spelling
    ``model.layers.*`` / ``visual.*``), or with ``spelling="module"`` one file of ``state_dict()`` names
    (``model.language_model.*`` / ``model.visual.*``). N(0, 1) weights, or with ``perturb`` the initialised
    weights plus N(0, perturb) (fp32; activations in a trained model's range, for logit comparisons)."""
    import transformers
    from transformers import Qwen2_5_VLForConditionalGeneration

    transformers.logging.set_verbosity_error()  # tiny vocabularies trip token-id range warnings
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_vl_config(**overrides))
    with torch.no_grad():  # norms init to 1 and biases to 0: make every tensor distinct
        for p in model.parameters():
            p.copy_(torch.randn_like(p) if perturb is None else p + perturb * torch.randn_like(p))
    if perturb is None:
        model.to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="100KB")
    (path / "tokenizer_config.json").write_text('{"tokenizer_class": "Qwen2Tokenizer"}\n')  # a side file to copy
    if spelling == "module":
        for f in list(path.glob("model*.safetensors*")):
            f.unlink()
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"
                 or not model.config.tie_word_embeddings}
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("vl_hf")
    return {"hub": make_checkpoint(d / "hub"), "module": make_checkpoint(d / "module", spelling="module"),
            "tied": make_checkpoint(d / "tied", seed=1, tie_word_embeddings=True),
            "sane": make_checkpoint(d / "sane", seed=2, perturb=0.02)}


def test_spellings_are_what_the_test_means(hf_dirs):
    hub, module = load_hf(hf_dirs["hub"]), load_hf(hf_dirs["module"])
    assert "model.layers.0.self_attn.q_proj.weight" in hub and "visual.blocks.0.attn.qkv.weight" in hub
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in module
    assert "model.visual.blocks.0.attn.qkv.weight" in module and "lm_head.weight" in hub and "lm_head.weight" in module
    assert "lm_head.weight" not in load_hf(hf_dirs["tied"])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("spelling", ["hub", "module", "tied"])
def test_round_trip_is_bit_identical(hf_dirs, tmp_path, spelling, layout):
    mm = hf_to_mm(hf_dirs[spelling], tmp_path / "mm", LAYOUTS[layout])
    assert (mm / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert_same_hf_dirs(hf_dirs[spelling], mm_to_hf(mm, hf_dirs[spelling], tmp_path / "hf"))


def test_both_spellings_give_the_same_megatron_checkpoint(hf_dirs, tmp_path):
    """The hub and module checkpoints hold the same weights (same seed) under the two spellings; the fused vision
    ``attn.qkv`` ``[q; k; v]`` becomes Megatron's per-head ``[q_h; k_h; v_h]``."""
    from converters.common.convert import hf_state_to_mm
    from mm_omni.models.qwen2_5_vl.convert import SPEC

    full = {}
    for spelling in ("hub", "module"):
        files = load_mm(hf_to_mm(hf_dirs[spelling], tmp_path / spelling, LAYOUTS["tp1"]))
        full[spelling] = files["mp_rank_00"]["model"]
        assert_same_tensors(full[spelling], hf_state_to_mm(SPEC, tiny_vl_config(), load_hf(hf_dirs[spelling])))
    assert_same_tensors(full["hub"], full["module"])
    q, k, v = load_hf(hf_dirs["hub"])["visual.blocks.2.attn.qkv.weight"].chunk(3)  # 2 heads of 16
    per_head = torch.cat([torch.cat([t[h * 16:(h + 1) * 16] for t in (q, k, v)]) for h in range(2)])
    assert torch.equal(full["hub"]["image_encoder.encoder.blocks.layers.2.self_attention.linear_qkv.weight"], per_head)


def test_tp2_pp2_files_and_model_json(hf_dirs, tmp_path):
    from mm_omni.registry import load_model_config

    mm = hf_to_mm(hf_dirs["tied"], tmp_path / "mm", LAYOUTS["tp2_pp2"])
    files = load_mm(mm)
    assert sorted(files) == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    s0, s1 = files["mp_rank_01_000"]["model"], files["mp_rank_01_001"]["model"]
    assert "image_encoder.projector.layernorm.weight" in s0 and not any(k.startswith("image_encoder.") for k in s1)
    assert not any(k.startswith("audio_encoder.") for f in files.values() for k in f["model"])
    # tied at PP2: the last stage holds the embedding's shard as its output layer
    assert torch.equal(s1["text_decoder.output_layer.weight"], s0["text_decoder.embedding.word_embeddings.weight"])
    family, cfg = load_model_config(mm / "model.json")
    assert family.name == "qwen2_5_vl" and cfg.audio_encoder is None
    assert (cfg.model_id, cfg.text_decoder.model_id) == ("qwen2_5vl", "qwen2_5_lm")
    assert cfg.text_decoder.pipeline_num_layers == [1, 2] and cfg.text_decoder.tp == 2
    assert cfg.image_encoder.vision_encoder.pipeline_num_layers == [4, 0]
    assert not cfg.text_decoder.untie_embeddings_and_output_weights


def test_resplit_equals_direct_conversion(hf_dirs, tmp_path):
    a = hf_to_mm(hf_dirs["hub"], tmp_path / "a", LAYOUTS["tp2_pp2"])
    converter().resplit(ResplitConfig(source_dir=a, target_dir=tmp_path / "via", target_parallel_config=LAYOUTS["tp1"]))
    via, direct = load_mm(tmp_path / "via"), load_mm(hf_to_mm(hf_dirs["hub"], tmp_path / "direct", LAYOUTS["tp1"]))
    assert sorted(via) == sorted(direct)
    for rank in direct:
        assert_same_tensors(via[rank]["model"], direct[rank]["model"])
    assert (tmp_path / "via" / "model.json").read_text() == (tmp_path / "direct" / "model.json").read_text()


def test_audio_options_are_refused(hf_dirs, tmp_path):
    with pytest.raises(ValueError, match=r"audio_pp_layers"):
        hf_to_mm(hf_dirs["hub"], tmp_path / "mm", dict(LAYOUTS["tp1"], audio_pp_layers=[[3]]))
    assert not (tmp_path / "mm").exists()


def test_unsupported_config_is_refused_before_reading_tensors(tmp_path):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    cfg = tiny_vl_config(text={"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1})
    (hf_dir / "config.json").write_text(cfg.to_json_string())
    (hf_dir / "model.safetensors").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"text_config\.use_sliding_window=True: not supported"):
        hf_to_mm(hf_dir, tmp_path / "mm", LAYOUTS["tp1"])
    assert not (tmp_path / "mm").exists()


def test_precision_check_passes(hf_dirs, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        hf_to_mm(hf_dirs["sane"], tmp_path / "mm", LAYOUTS["tp2_pp2"], test_convert_precision=True)
    for module in ("vision encoder (image + video)", "logits (text + image + video)"):
        assert any(module in m and "rel max error" in m for m in caplog.messages), (module, caplog.messages[-5:])


def test_export_of_a_changed_checkpoint_gives_our_logits(hf_dirs, tmp_path):
    """Change every tensor on the Megatron side (as training does), export, load with transformers'
    ``from_pretrained``: its logits are our model's on the changed checkpoint."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mm_omni.models.qwen2_5_vl import precision

    init_megatron()
    mm = hf_to_mm(hf_dirs["sane"], tmp_path / "mm", LAYOUTS["tp1"])
    path = mm / "release" / "mp_rank_00" / "model_optim_rng.pt"
    payload = torch.load(path, weights_only=True)
    gen = torch.Generator().manual_seed(5)
    for t in payload["model"].values():
        t.add_(0.01 * torch.randn(t.shape, generator=gen))
    torch.save(payload, path)
    out = mm_to_hf(mm, hf_dirs["sane"], tmp_path / "hf")
    exported = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    cfg = exported.config
    ours = precision.build_model(cfg).float().eval()
    missing, unexpected = ours.load_state_dict(payload["model"], strict=False)
    assert not unexpected and all(k.endswith("._extra_state") for k in missing)
    before = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dirs["sane"], dtype=torch.float32).eval()
    row = precision.probe_row(cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, mine, original = exported(**row).logits, ours(**row, return_logits=True).logits, before(**row).logits
    err = rel_err(mine, theirs)
    print(f"exported logits vs ours: rel err {err:.2e}")
    assert err < 1e-5
    assert rel_err(original, theirs) > 1e-3  # the change is visible: the export is not the original
    assert json.loads((out / "config.json").read_text()) == json.loads((hf_dirs["sane"] / "config.json").read_text())
