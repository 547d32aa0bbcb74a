"""mm_to_hf / resplit of a LoRA checkpoint: adapters merged (W + alpha/r * B @ A), no lora keys left.

A tiny HF thinker checkpoint -> hf_to_mm -> our OmniModel with LoRA on every linear (text, vision, audio,
projectors, output layer), ``B`` set to random values (what training does to it) -> saved as a
training run saves it (``{"model": state_dict, "args": {..., "lora_alpha", "lora_r"}}``), once at TP=1
and once split to TP=2 (A/B shards as the adapters hold them). Then:

- mm_to_hf of both equals mm_to_hf of a checkpoint merged by hand in the test (fp64 ``W + s B A``);
- the export loads in transformers' thinker, whose logits on a batch with image, video, audio and
  text rows match our model running with its (unmerged) adapters;
- resplit of the LoRA checkpoint writes a plain checkpoint equal to the hand-merged one;
- an adapter-only checkpoint (what a LoRA run saves, at TP=2) read over its base (TP=1) exports the same;
- ``save_lora_as_peft`` writes a PEFT adapter that peft loads into transformers' thinker on hf_dir's
  weights, giving the merged export's logits.
"""

from __future__ import annotations

import pytest
import torch

from converters.common.plan import Plan
from mm_omni.checkpoint import tp as tp_ops
from mm_omni.models.qwen2_5_omni.convert import SPEC
from tests.unit.converters.helpers import hf_to_mm, layout, load_hf, mm_to_hf, resplit

ALPHA, R = 8.0, 4


def _save(root, ranks: list[dict], args: dict | None, **extra) -> None:
    for t, sd in enumerate(ranks):
        d = root / "release" / f"mp_rank_{t:02d}"
        d.mkdir(parents=True)
        payload = {"model": sd, "checkpoint_version": 3.0, **extra}
        if args is not None:
            payload["args"] = args
        torch.save(payload, d / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text("release")


def _split_tp2(sd: dict, thinker) -> list[dict]:
    split_kind = Plan(SPEC, thinker).split_kind
    out = [{}, {}]
    for name, t in sd.items():
        if ".lora_" in name:
            base = name.split(".lora_")[0] + ".weight"
            # column-parallel: A replicated, B split like W; row-parallel ("col"): A split like W, B replicated
            a_kind, b_kind = ("col", "rep") if split_kind(base) == "col" else ("rep", split_kind(base))
            kind = a_kind if ".lora_A." in name else b_kind
        else:
            kind = split_kind(name)
        for r in range(2):
            out[r][name] = tp_ops.shard(t, kind, 2, r).clone()
    return out


def _thinker_checkpoint(path):
    """A bare thinker checkpoint (fast to build), initialised weights + N(0, 0.02): sane activations."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration

    from tests.conftest import tiny_thinker_config

    torch.manual_seed(2)
    model = Qwen2_5OmniThinkerForConditionalGeneration(tiny_thinker_config())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    from transformers import AutoConfig

    from converters.common.converter import open_mm
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config
    from mm_omni.lora.inject import apply_lora, parse_targets
    from mm_omni.models.omni import OmniModel
    from tests.helpers import init_megatron

    d = tmp_path_factory.mktemp("lora_export")
    hf_dir = _thinker_checkpoint(d / "hf")
    config = AutoConfig.from_pretrained(hf_dir)
    thinker = getattr(config, "thinker_config", config)
    base_mm = hf_to_mm(hf_dir, d / "base_mm", layout([[3]], [[4]], [[3]]), dtype="fp32")
    init_megatron()
    model = OmniModel(from_hf_thinker_config(thinker)).float().eval()
    reader = open_mm(Plan(SPEC, thinker), base_mm)
    model.load_state_dict({n: reader.get(n).float() for n in reader.names()}, strict=False)
    found = apply_lora(model, parse_targets(["all-linear", "output_layer"]), R, ALPHA, 0.0, seed=7)
    assert any(n.startswith("image_encoder.projector") for n in found["adapted"])
    assert "audio_encoder.encoder.proj" in found["adapted"]  # a plain torch.nn.Linear
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    args = {"lora_alpha": ALPHA, "lora_r": R, "lora_target_modules": ["all-linear"]}
    _save(d / "lora_tp1", [sd], args)
    _save(d / "lora_tp2", _split_tp2(sd, thinker), args)
    # a LoRA run's own save: the adapters only (here at TP=2, over the TP=1 base it loaded)
    _save(d / "adapters_tp2", [{k: v for k, v in r.items() if ".lora_" in k} for r in _split_tp2(sd, thinker)], args,
          lora_only=True)
    # merged by hand, in fp64, then a plain (LoRA-free) checkpoint
    by_hand = {k: v for k, v in sd.items() if ".lora_" not in k}
    for k in sd:
        if ".lora_A." in k:
            base = k.replace(".lora_A.", ".")
            b = sd[k.replace(".lora_A.", ".lora_B.")]
            by_hand[base] = (sd[base].double() + ALPHA / R * (b.double() @ sd[k].double())).float()
    _save(d / "merged_by_hand", [by_hand], None)
    return d, hf_dir, thinker, model, by_hand, base_mm


def test_mm_to_hf_merges_lora_like_a_hand_merge(lora_setup):
    d, hf_dir, *_ = lora_setup
    ref = load_hf(mm_to_hf(d / "merged_by_hand", hf_dir, d / "hf_by_hand"))
    original = load_hf(hf_dir)
    for name in ("lora_tp1", "lora_tp2"):
        out = load_hf(mm_to_hf(d / name, hf_dir, d / f"hf_{name}"))
        assert set(out) == set(ref) == set(original) and not any("lora" in k for k in out)
        for k in ref:
            torch.testing.assert_close(out[k], ref[k], rtol=1e-6, atol=1e-6, msg=f"{name} {k}")
        q = next(k for k in out if k.endswith("layers.1.self_attn.q_proj.weight"))
        assert not torch.allclose(out[q].float(), original[q].float(), atol=1e-4)  # the delta is in


def test_export_loads_in_transformers_and_matches_our_lora_model(lora_setup):
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration

    from tests.parity.test_thinker import MODEL_KEYS, hf_positions, make_batch, mm_positions
    from tests.helpers import rel_err

    d, hf_dir, thinker, model, *_ = lora_setup
    out = d / "hf_lora_tp2"
    if not out.exists():
        mm_to_hf(d / "lora_tp2", hf_dir, out)
    hf = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    batch = make_batch(thinker)
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config

    inputs = {k: batch[k] for k in MODEL_KEYS if k not in ("use_audio_in_video", "labels")}
    with torch.no_grad():
        ref = hf(position_ids=hf_positions(hf, batch), **inputs).logits
        ours = model(position_ids=mm_positions(from_hf_thinker_config(thinker), batch), return_logits=True,
                     use_audio_in_video=batch["use_audio_in_video"], **inputs).logits
    valid = batch["attention_mask"].bool()
    assert rel_err(ours[valid], ref[valid]) < 1e-5  # measured 8e-7


def test_resplit_writes_a_merged_plain_checkpoint(lora_setup):
    d, hf_dir, *_ , by_hand, _ = lora_setup
    out = resplit(d / "lora_tp2", d / "resplit", layout([[3]], [[4]], [[3]]), hf_config={"hf_dir": hf_dir})
    sd = torch.load(out / "release" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)["model"]
    assert set(sd) == set(by_hand)
    for k in sd:
        torch.testing.assert_close(sd[k], by_hand[k], rtol=1e-6, atol=1e-6, msg=k)


def test_adapter_only_checkpoint_over_its_base_exports_like_a_hand_merge(lora_setup):
    d, hf_dir, *_, by_hand, base_mm = lora_setup
    ref = load_hf(mm_to_hf(d / "merged_by_hand", hf_dir, d / "hf_ref_for_adapters"))
    out = load_hf(mm_to_hf(base_mm, hf_dir, d / "hf_from_adapters", lora_load_dir=d / "adapters_tp2"))
    assert set(out) == set(ref)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-6, atol=1e-6, msg=k)
    plain = resplit(base_mm, d / "resplit_adapters", layout([[3]], [[4]], [[3]]), hf_config={"hf_dir": hf_dir},
                    lora_load_dir=d / "adapters_tp2")
    sd = torch.load(plain / "release" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)["model"]
    assert set(sd) == set(by_hand)
    for k in sd:
        torch.testing.assert_close(sd[k], by_hand[k], rtol=1e-6, atol=1e-6, msg=k)


def test_adapter_sources_that_cannot_work_fail_naming_the_option(lora_setup, tmp_path):
    from safetensors.torch import load_file, save_file

    d, hf_dir, *_, base_mm = lora_setup
    with pytest.raises(ValueError, match="holds only LoRA adapters.*--cfg.lora_load_dir"):
        mm_to_hf(d / "adapters_tp2", hf_dir, tmp_path / "a")
    with pytest.raises(ValueError, match="adapters itself and lora_load_dir"):
        mm_to_hf(d / "lora_tp1", hf_dir, tmp_path / "b", lora_load_dir=d / "adapters_tp2")
    with pytest.raises(ValueError, match="save_lora_as_peft: .* holds no LoRA adapters"):
        mm_to_hf(base_mm, hf_dir, tmp_path / "c", save_lora_as_peft=True)
    other = tmp_path / "other_hf"  # another base than the adapters were trained on
    other.mkdir()
    (other / "config.json").write_text((hf_dir / "config.json").read_text())
    for f in hf_dir.glob("*.safetensors"):
        save_file({k: v + 1e-3 for k, v in load_file(f).items()}, other / f.name, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="save_lora_as_peft: the base weight .* differs"):
        mm_to_hf(d / "lora_tp1", other, tmp_path / "d", save_lora_as_peft=True)


@pytest.mark.parametrize("source", ["combined", "adapters"])
def test_peft_export_loads_in_peft_and_matches_the_merged_export(lora_setup, source):
    import warnings

    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration

    from tests.helpers import rel_err
    from tests.parity.test_thinker import MODEL_KEYS, hf_positions, make_batch

    d, hf_dir, thinker, *_, base_mm = lora_setup
    merged = d / "hf_lora_tp2"
    if not merged.exists():
        mm_to_hf(d / "lora_tp2", hf_dir, merged)
    out = d / f"peft_{source}"
    if source == "combined":
        mm_to_hf(d / "lora_tp1", hf_dir, out, save_lora_as_peft=True)
    else:
        mm_to_hf(base_mm, hf_dir, out, lora_load_dir=d / "adapters_tp2", save_lora_as_peft=True)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(out / "adapter_model.safetensors")
    text, vision = "base_model.model.model.language_model.", "base_model.model.model.visual."
    q, k, v = (f"{text}layers.1.self_attn.{p}_proj.lora_A.weight" for p in "qkv")
    assert torch.equal(saved[q], saved[k]) and torch.equal(saved[q], saved[v])  # the fused QKV's one A
    assert saved[q.replace("lora_A", "lora_B")].shape[0] == thinker.text_config.hidden_size  # B split per q/k/v
    for name in (f"{text}layers.0.mlp.gate_proj.lora_B.weight", f"{vision}blocks.0.attn.q.lora_A.weight",
                 f"{vision}merger.mlp.0.lora_A.weight", "base_model.model.lm_head.lora_B.weight"):
        assert name in saved, name

    def batch_inputs(model):
        return dict(position_ids=hf_positions(model, batch),
                    **{k: batch[k] for k in MODEL_KEYS if k not in ("use_audio_in_video", "labels")})

    batch = make_batch(thinker)
    ref_model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(merged, dtype=torch.float32).eval()
    base = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base, out).eval()
    assert not [w for w in caught if "adapter keys" in str(w.message)], [str(w.message) for w in caught]
    loaded = {k: t for k, t in peft_model.state_dict().items() if ".lora_" in k}
    assert len(loaded) == len(saved)  # every saved tensor found its module, and no module was left without
    with torch.no_grad():
        ref = ref_model(**batch_inputs(ref_model)).logits
        ours = peft_model(**batch_inputs(base)).logits
        with peft_model.disable_adapter():
            plain = peft_model(**batch_inputs(base)).logits
    valid = batch["attention_mask"].bool()
    print(f"peft vs merged export: rel err {rel_err(ours[valid], ref[valid]):.1e}; "
          f"base alone: {rel_err(plain[valid], ref[valid]):.1e}")  # shown with -s
    assert rel_err(ours[valid], ref[valid]) < 1e-5
    assert rel_err(plain[valid], ref[valid]) > 1e-3  # the adapters matter
