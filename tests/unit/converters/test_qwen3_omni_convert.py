"""``mm-convert Qwen3_OmniConverter``: hf_to_mm -> mm_to_hf bit-identical (every tensor of the checkpoint, the
talker's and code2wav's included, index, config) for TP2, PP2, EP2 and EP2 x TP2; the expert-parallel files hold
megatron's layout (``mp_rank_TT_PPP_EEE``, EP rank r with experts r*E/ep.. renumbered from 0, every other tensor
replicated); resplit between EP sizes equals direct conversion; the export loads in transformers' full model;
an EP size that does not split the experts is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from converters.config import HfToMmConfig, MmToHfConfig, ResplitConfig
from mm_omni.checkpoint import format as fmt
from mm_omni.checkpoint import tp as tp_ops
from tests.unit.converters.helpers import assert_same_hf_dirs, assert_same_tensors, load_hf, load_mm

E = 4  # experts per text layer
TEXT = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, moe_intermediate_size=32, num_experts=E, num_experts_per_tok=2,
            decoder_sparse_step=1, mlp_only_layers=[], pad_token_id=0,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [6, 5, 5],
                             "interleaved": True, "mrope_interleaved": True})
VISION = dict(depth=2, hidden_size=32, intermediate_size=44, num_heads=2, in_channels=3, patch_size=4,
              temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=36,
              deepstack_visual_indexes=[0, 1])
AUDIO = dict(num_mel_bins=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=44, d_model=32,
             output_dim=64, downsample_hidden_size=8, n_window=50, n_window_infer=200, conv_chunksize=3,
             max_source_positions=64)
THINKER = dict(text_config=TEXT, vision_config=VISION, audio_config=AUDIO, position_id_per_seconds=13,
               audio_token_id=500, image_token_id=501, video_token_id=502, audio_start_token_id=503)
from tests.fixtures.qwen3_omni_moe import TINY_CODE2WAV as CODE2WAV, TINY_TALKER as TALKER  # noqa: E402


def layout(llm=((2,),), vit=((2,),), audio=((2,),), tp=1, ep=1) -> dict:
    return dict(llm_pp_layers=[list(c) for c in llm], vit_pp_layers=[list(c) for c in vit],
                audio_pp_layers=[list(c) for c in audio], tp_size=tp, ep_size=ep)


LAYOUTS = {
    "tp1": layout(),
    "tp2": layout(tp=2),
    "pp2": layout(((1, 1),), ((2, 0),), ((2, 0),)),
    "ep2": layout(ep=2),
    "ep2_tp2_pp2": layout(((1, 1),), ((2, 0),), ((2, 0),), tp=2, ep=2),
}


def make_checkpoint(path: Path, seed: int = 0, perturb: float | None = None) -> Path:
    """save_pretrained of a random full Qwen3-Omni (thinker, talker with code predictor, code2wav): bf16 thinker
    and talker, fp32 code2wav, sharded so that several files and an index exist. N(0, 1) tensors, or with
    ``perturb`` the initialised weights plus N(0, perturb), all fp32 (activations in a trained model's range,
    for comparing outputs)."""
    import transformers
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeForConditionalGeneration

    transformers.logging.set_verbosity_error()  # tiny vocabularies and rope keys of the tiny talker
    cfg = Qwen3OmniMoeConfig(thinker_config=THINKER, talker_config=TALKER, code2wav_config=CODE2WAV,
                             enable_audio_output=True)
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(cfg)
    with torch.no_grad():  # norms init to 1 and biases to 0: make every tensor distinct
        for p in model.parameters():
            p.copy_(torch.randn_like(p) if perturb is None else p + perturb * torch.randn_like(p))
    if perturb is None:
        model.thinker.to(torch.bfloat16)
        model.talker.to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="200KB")
    (path / "tokenizer_config.json").write_text('{"tokenizer_class": "Qwen2Tokenizer"}\n')  # a side file to copy
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("hf") / "Qwen3-Omni-tiny")


@pytest.fixture(scope="module")
def sane_hf_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("hf_sane") / "tiny-sane", seed=2, perturb=0.02)


def converter():
    from mm_omni.registry import by_name

    return by_name("qwen3_omni_moe").load("converter")


def hf_to_mm(hf_dir: Path, mm_dir: Path, pc: dict) -> Path:
    converter().hf_to_mm(HfToMmConfig(mm_dir=mm_dir, hf_config={"hf_dir": hf_dir}, parallel_config=pc))
    return mm_dir


def mm_to_hf(mm_dir: Path, hf_dir: Path, out: Path, pc: dict | None = None) -> Path:
    converter().mm_to_hf(MmToHfConfig(mm_dir=mm_dir, hf_config={"hf_dir": hf_dir}, save_hf_dir=out,
                                      parallel_config=pc))
    return out


def resplit(src: Path, dst: Path, pc: dict) -> Path:
    converter().resplit(ResplitConfig(source_dir=src, target_dir=dst, target_parallel_config=pc))
    return dst


def test_checkpoint_is_what_the_test_means(hf_dir):
    keys = load_hf(hf_dir)
    assert any(k.startswith("talker.code_predictor.") for k in keys) and any(k.startswith("code2wav.") for k in keys)
    assert "thinker.model.layers.1.mlp.experts.3.gate_proj.weight" in keys  # stored one tensor per expert
    assert "thinker.visual.merger_list.1.mlp.0.weight" in keys and "thinker.audio_tower.proj2.weight" in keys
    assert len(list(hf_dir.glob("*.safetensors"))) > 2


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_round_trip_is_bit_identical(hf_dir, tmp_path, name):
    mm = hf_to_mm(hf_dir, tmp_path / "mm", LAYOUTS[name])
    back = mm_to_hf(mm, hf_dir, tmp_path / "hf")
    assert_same_hf_dirs(hf_dir, back)  # every tensor (talker / code2wav too), shard files, weight map, side files
    assert (back / "config.json").read_bytes() == (hf_dir / "config.json").read_bytes()
    index = lambda d: json.loads((d / "model.safetensors.index.json").read_text())  # noqa: E731
    assert index(back) == index(hf_dir)


def test_rank_directory_names():
    assert fmt.rank_dir_name(1, 2, 4) == "mp_rank_01_002" and fmt.rank_dir_name(1, 0, 1) == "mp_rank_01"
    assert fmt.rank_dir_name(1, 0, 1, ep_rank=3, ep_size=4) == "mp_rank_01_000_003"  # the PP field always with EP
    assert fmt.rank_dir_name(0, 2, 4, 1, 2) == "mp_rank_00_002_001"
    assert fmt.parse_rank_dir("mp_rank_01_002_003", with_ep=True) == (1, 2, 3)
    assert fmt.parse_rank_dir("mp_rank_01_002", with_ep=True) == (1, 2, 0)
    assert fmt.parse_rank_dir("mp_rank_01", with_ep=True) == (1, 0, 0)
    assert fmt.parse_rank_dir("mp_rank_01_002_003") == (1, 2) and fmt.parse_rank_dir("mp_rank_01_002") == (1, 2)
    for name in ("mp_rank_01_002_3", "mp_rank_01__003", "mp_rank_01_002_003_004"):
        assert fmt.parse_rank_dir(name, with_ep=True) is None, name
    assert fmt.rank_file("/ck/release", 0, 0, 1, 1, 2).as_posix() == "/ck/release/mp_rank_00_000_001/model_optim_rng.pt"


def test_expert_parallel_files_hold_megatron_layout(hf_dir, tmp_path):
    hf = load_hf(hf_dir)
    files = load_mm(hf_to_mm(hf_dir, tmp_path / "mm", LAYOUTS["ep2_tp2_pp2"]))
    assert sorted(files) == [f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2) for e in range(2)]
    for t in range(2):
        for p in range(2):
            ranks = [files[f"mp_rank_{t:02d}_{p:03d}_{e:03d}"]["model"] for e in range(2)]
            shared = [{k: v for k, v in sd.items() if ".local_experts." not in k} for sd in ranks]
            assert shared[0] and shared[0].keys() == shared[1].keys()
            assert_same_tensors(shared[0], shared[1])  # every non-expert tensor replicated in each EP rank
            for e, sd in enumerate(ranks):
                fc1 = "text_decoder.decoder.layers.0.mlp.experts.local_experts.{}.linear_fc1.weight"
                fc2 = "text_decoder.decoder.layers.0.mlp.experts.local_experts.{}.linear_fc2.weight"
                assert sorted(k for k in sd if k.startswith(fc1[:-len("{}.linear_fc1.weight")])) == sorted(
                    f.format(i) for i in range(E // 2) for f in (fc1, fc2))  # local experts 0..E/ep-1
                for i in range(E // 2):
                    g = e * E // 2 + i  # global expert of EP rank e's local expert i
                    hf_layer = f"thinker.model.layers.{p}.mlp.experts.{g}."  # PP2: text layer p on stage p
                    gate, up = hf[hf_layer + "gate_proj.weight"], hf[hf_layer + "up_proj.weight"]
                    assert torch.equal(sd[fc1.format(i)], tp_ops.shard(torch.cat([gate, up]), "glu", 2, t))
                    assert torch.equal(sd[fc2.format(i)], tp_ops.shard(hf[hf_layer + "down_proj.weight"], "col", 2, t))
    router = files["mp_rank_01_001_001"]["model"]["text_decoder.decoder.layers.0.mlp.router.weight"]
    assert torch.equal(router, hf["thinker.model.layers.1.mlp.gate.weight"])  # the router: whole, replicated


def test_without_expert_parallelism_names_are_unchanged(hf_dir, tmp_path):
    assert sorted(load_mm(hf_to_mm(hf_dir, tmp_path / "a", LAYOUTS["tp2"]))) == ["mp_rank_00", "mp_rank_01"]
    assert sorted(load_mm(hf_to_mm(hf_dir, tmp_path / "b", LAYOUTS["pp2"]))) == ["mp_rank_00_000", "mp_rank_00_001"]


@pytest.mark.parametrize("source, target", [("ep2", "tp1"), ("ep2_tp2_pp2", "ep2"), ("tp1", "ep2_tp2_pp2")])
def test_resplit_between_ep_sizes_equals_direct_conversion(hf_dir, tmp_path, source, target):
    via = load_mm(resplit(hf_to_mm(hf_dir, tmp_path / "src", LAYOUTS[source]), tmp_path / "via", LAYOUTS[target]))
    direct = load_mm(hf_to_mm(hf_dir, tmp_path / "direct", LAYOUTS[target]))
    assert sorted(via) == sorted(direct)
    for rank in direct:
        assert_same_tensors(via[rank]["model"], direct[rank]["model"])
    assert (tmp_path / "via" / "model.json").read_text() == (tmp_path / "direct" / "model.json").read_text()


def test_model_json_is_the_families(hf_dir, tmp_path):
    from mm_omni.registry import load_model_config

    family, cfg = load_model_config(hf_to_mm(hf_dir, tmp_path / "mm", LAYOUTS["ep2_tp2_pp2"]) / "model.json")
    assert family.name == "qwen3_omni_moe"
    assert cfg.text_decoder.num_moe_experts == E and cfg.text_decoder.pipeline_num_layers == [1, 1]
    assert cfg.text_decoder.tp == 2 and cfg.image_encoder.vision_encoder.pipeline_num_layers == [2, 0]


def test_export_loads_in_transformers_with_the_talker(hf_dir, tmp_path):
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeForConditionalGeneration

    back = mm_to_hf(hf_to_mm(hf_dir, tmp_path / "mm", LAYOUTS["ep2_tp2_pp2"]), hf_dir, tmp_path / "hf")
    loaded, info = Qwen3OmniMoeForConditionalGeneration.from_pretrained(back, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert loaded.has_talker and loaded.talker is not None and loaded.code2wav is not None
    original = Qwen3OmniMoeForConditionalGeneration.from_pretrained(hf_dir).state_dict()
    state = loaded.state_dict()
    assert any(k.startswith("talker.") for k in state) and any(k.startswith("code2wav.") for k in state)
    assert_same_tensors(state, original)


def test_ep_size_must_divide_the_experts(hf_dir, tmp_path):
    with pytest.raises(ValueError, match=r"ep_size=3 does not divide text num_experts=4: use a divisor of 4"):
        hf_to_mm(hf_dir, tmp_path / "mm", layout(ep=3))
    assert not (tmp_path / "mm").exists()  # refused before anything is written
    with pytest.raises(ValueError, match=r"ep_size=8 does not divide text num_experts=4"):
        hf_to_mm(hf_dir, tmp_path / "mm", layout(ep=8))


def test_given_layout_must_match_the_checkpoints_ep_size(hf_dir, tmp_path):
    mm = hf_to_mm(hf_dir, tmp_path / "mm", LAYOUTS["ep2"])
    with pytest.raises(ValueError, match=r"ep_size: checkpoint 2, parallel_config 1"):
        mm_to_hf(mm, hf_dir, tmp_path / "hf", pc=LAYOUTS["tp1"])


def test_dense_family_refuses_expert_parallelism(tmp_path):
    from converters.common.plan import Plan
    from converters.config import ParallelConfig
    from mm_omni.models.qwen2_5_omni.convert import SPEC
    from tests.conftest import tiny_thinker_config

    plan = Plan(SPEC, tiny_thinker_config())
    layers = plan.layers()
    pc = ParallelConfig(llm_pp_layers=[[layers["text"]]], vit_pp_layers=[[layers["vision"]]], ep_size=2)
    with pytest.raises(ValueError, match=r"ep_size=2: Qwen2.5-Omni has no experts; use 1"):
        plan.make_layout(pc)


def test_precision_check_passes(sane_hf_dir, tmp_path, caplog):
    import logging

    from tests.helpers import init_megatron

    init_megatron()
    with caplog.at_level(logging.INFO, logger="converters.common.precision"):
        converter().hf_to_mm(HfToMmConfig(mm_dir=tmp_path / "mm", hf_config={"hf_dir": sane_hf_dir},
                                          parallel_config=LAYOUTS["ep2_tp2_pp2"], test_convert_precision=True))
    checked = [r.getMessage() for r in caplog.records if "rel max error" in r.getMessage()]
    assert len(checked) == 5, checked  # merged vision features, 2 deepstack mergers, audio, logits
    assert any(m.startswith("test_convert_precision: deepstack merger 1") for m in checked)


def _adapter_only_save(base: Path, dst: Path, r: int = 4, alpha: float = 8.0) -> Path:
    """What a LoRA run at EP 2 saves (adapters only, one rank directory per EP rank) over ``base``: adapters on
    every decoder layer's fused QKV and every expert's two linears, ``A`` and ``B`` random and seeded by the
    global name (attention's replicated over EP ranks, each expert's its own)."""
    import re
    import zlib

    targets = re.compile(r"text_decoder\.decoder\.layers\.\d+\.(self_attention\.linear_qkv|mlp\.experts\."
                         r"local_experts\.(\d+)\.linear_fc[12])\.weight$")
    for rank_file in sorted((base / "release").glob("*/*.pt")):
        ep_rank = int(rank_file.parent.name.rsplit("_", 1)[1])
        adapters = {}
        for name, w in torch.load(rank_file, weights_only=True)["model"].items():
            m = targets.match(name)
            if m is None:
                continue
            glob = name if m.group(2) is None else name.replace(
                f"local_experts.{m.group(2)}.", f"local_experts.{ep_rank * E // 2 + int(m.group(2))}.")
            gen = torch.Generator().manual_seed(zlib.crc32(glob.encode()))
            stem = name.removesuffix(".weight")
            adapters[f"{stem}.lora_A.weight"] = (torch.randn(r, w.shape[1], generator=gen) * 0.1).to(w.dtype)
            adapters[f"{stem}.lora_B.weight"] = (torch.randn(w.shape[0], r, generator=gen) * 0.1).to(w.dtype)
        out = dst / "release" / rank_file.parent.name
        out.mkdir(parents=True)
        torch.save({"model": adapters, "checkpoint_version": 3.0, "args": {"lora_alpha": alpha, "lora_r": r}},
                   out / rank_file.name)
    (dst / "latest_checkpointed_iteration.txt").write_text("release")
    return dst


def test_expert_parallel_lora_adapters_merge_like_a_hand_merge(hf_dir, tmp_path):
    """mm_to_hf of an EP-2 base with an EP-2 adapter-only save (``lora_load_dir``) equals mm_to_hf of the base
    with ``W + alpha/r * B @ A`` merged by hand into each rank file: every expert's adapter reaches its own
    global expert, the attention adapters once."""
    import shutil

    from mm_omni.lora.merge import merged_weight

    base = hf_to_mm(hf_dir, tmp_path / "mm", LAYOUTS["ep2"])
    adapters = _adapter_only_save(base, tmp_path / "lora")
    hand = tmp_path / "hand"
    shutil.copytree(base, hand)
    n = 0
    for rank_file in sorted((hand / "release").glob("*/*.pt")):
        payload = torch.load(rank_file, weights_only=False)
        lora = torch.load(adapters / "release" / rank_file.parent.name / rank_file.name, weights_only=True)["model"]
        for name in list(payload["model"]):
            stem = name.removesuffix(".weight")
            if f"{stem}.lora_A.weight" in lora:
                payload["model"][name] = merged_weight(payload["model"][name], lora[f"{stem}.lora_A.weight"],
                                                       lora[f"{stem}.lora_B.weight"], 8.0 / 4)
                n += 1
        torch.save(payload, rank_file)
    assert n == 2 * (2 + 2 * E // 2 * 2)  # per EP rank: 2 layers x (QKV + 2 local experts x 2 linears)
    merged = tmp_path / "merged"
    converter().mm_to_hf(MmToHfConfig(mm_dir=base, hf_config={"hf_dir": hf_dir}, save_hf_dir=merged,
                                      lora_load_dir=adapters))
    by_hand = mm_to_hf(hand, hf_dir, tmp_path / "by_hand")
    assert_same_tensors(load_hf(merged), load_hf(by_hand))
    original, out = load_hf(hf_dir), load_hf(merged)
    changed = {k for k in out if not torch.equal(out[k], original[k])}
    assert {k for k in changed if ".mlp.experts." in k} == {
        f"thinker.model.layers.{i}.mlp.experts.{e}.{p}_proj.weight" for i in range(2) for e in range(E)
        for p in ("gate", "up", "down")}


def test_expert_lora_as_peft_adapter_matches_the_merged_export(sane_hf_dir, tmp_path):
    """``save_lora_as_peft`` of the EP-2 adapters: attention adapters on q/k/v modules, each layer's expert
    adapters on transformers' fused ``gate_up_proj`` / ``down_proj`` (peft's ``target_parameters``); peft on
    hf_dir's thinker gives the merged export's logits."""
    import warnings

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeForConditionalGeneration

    from tests.helpers import rel_err

    base = hf_to_mm(sane_hf_dir, tmp_path / "mm", LAYOUTS["ep2"])
    adapters = _adapter_only_save(base, tmp_path / "lora")
    merged, peft_dir = tmp_path / "merged", tmp_path / "peft"
    for out, as_peft in ((merged, False), (peft_dir, True)):
        converter().mm_to_hf(MmToHfConfig(mm_dir=base, hf_config={"hf_dir": sane_hf_dir}, save_hf_dir=out,
                                          lora_load_dir=adapters, save_lora_as_peft=as_peft))
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["target_parameters"] == [f"model.language_model.layers.{i}.mlp.experts.{p}" for i in range(2)
                                           for p in ("gate_up_proj", "down_proj")]
    saved = load_file(peft_dir / "adapter_model.safetensors")
    experts = "base_model.model.model.language_model.layers.0.mlp.experts."
    assert saved[f"{experts}base_layer.lora_A.weight"].shape == (E * 4, TEXT["hidden_size"])  # gate_up: [E r, h]
    assert saved[f"{experts}lora_B.weight"].shape == (TEXT["hidden_size"], 4 * E)  # down: [h, r E]
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = Qwen3OmniMoeForConditionalGeneration.from_pretrained(merged, dtype=torch.float32).thinker.eval()
    thinker = Qwen3OmniMoeForConditionalGeneration.from_pretrained(sane_hf_dir, dtype=torch.float32).thinker.eval()
    with torch.no_grad():
        before = thinker(input_ids=ids).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(thinker, peft_dir).eval()
    assert not [w for w in caught if "adapter keys" in str(w.message)], [str(w.message) for w in caught]
    assert len({k for k in peft_model.state_dict() if ".lora_" in k}) == len(saved)
    with torch.no_grad():
        want, got = ref(input_ids=ids).logits, peft_model(input_ids=ids).logits
    assert rel_err(before, want) > 1e-2  # the adapters matter
    assert rel_err(got, want) < 1e-5, rel_err(got, want)
