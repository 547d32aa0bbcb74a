"""The declarative HF <-> Megatron table: pattern expansion, each op's exact inverse, split rules, HF spellings."""

from __future__ import annotations

import logging

import pytest
import torch

from mm_omni.checkpoint import tp
from mm_omni.checkpoint.mapping import (Attention, HfNames, Map, Rule, expand, fuse, hf_to_mm, mm_to_hf, name_regex,
                                        unfuse)

GQA = Attention(heads=4, groups=2, head_dim=3)  # 2 query heads per KV group
MHA = Attention(heads=4, groups=4, head_dim=3)


def _rule(op: str, n_hf: int, attention: Attention | None = None) -> Rule:
    groups, rows = (attention.groups, attention.rows()) if attention else (0, ())
    return Rule("mm.w", tuple(f"hf.{i}" for i in range(n_hf)), op, "row", groups, rows)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


# -- expansion ------------------------------------------------------------------------------------
TABLE = (
    Map("t.emb.weight", "model.embed.weight", split="row", module="text"),
    Map("t.layers.{layer}.norm.weight", "model.layers.{layer}.ln.weight", module="text"),
    Map("t.layers.{layer}.fc1.weight", ("model.layers.{layer}.gate.weight", "model.layers.{layer}.up.weight"),
        op="gate_up", split="glu", module="text"),
    Map("t.final.weight", "model.norm.weight", module="text"),
    Map("v.layers.{layer}.qkv.weight", ("visual.{layer}.q", "visual.{layer}.k", "visual.{layer}.v"), op="qkv",
        split="row", module="vision"),
    Map("v.layers.{layer}.experts.{expert}.fc2.weight", "visual.{layer}.experts.{expert}.down", split="col",
        module="vision"),
)


def test_expand_orders_statics_then_layer_by_layer_and_fills_every_placeholder():
    rules = expand(TABLE, {"text": {"layer": 2}, "vision": {"layer": 2, "expert": 2}}, {"vision": MHA})
    assert [r.mm for r in rules] == [
        "t.emb.weight", "t.final.weight",
        "t.layers.0.norm.weight", "t.layers.0.fc1.weight", "t.layers.1.norm.weight", "t.layers.1.fc1.weight",
        "v.layers.0.qkv.weight", "v.layers.0.experts.0.fc2.weight", "v.layers.0.experts.1.fc2.weight",
        "v.layers.1.qkv.weight", "v.layers.1.experts.0.fc2.weight", "v.layers.1.experts.1.fc2.weight"]
    by = {r.mm: r for r in rules}
    assert by["t.layers.1.fc1.weight"].hf == ("model.layers.1.gate.weight", "model.layers.1.up.weight")
    assert by["v.layers.1.experts.1.fc2.weight"].hf == ("visual.1.experts.1.down",)
    assert (by["v.layers.0.qkv.weight"].groups, by["v.layers.0.qkv.weight"].rows) == (4, (3, 3, 3))
    assert by["t.layers.0.fc1.weight"].split == "glu" and by["v.layers.1.experts.0.fc2.weight"].split == "col"
    assert by["t.emb.weight"].split == "row" and by["t.final.weight"].split == "rep"
    assert expand(TABLE[:4], {"text": {"layer": 0}}) == rules[:2]  # no layers: the statics alone


def test_table_errors_name_the_entry():
    with pytest.raises(KeyError, match=r"t.layers.\{layer\}.norm.weight: no count of \['layer'\] for module 'text'"):
        expand(TABLE[:2], {"text": {}})
    with pytest.raises(KeyError, match="module 'vision' has qkv entries but no Attention"):
        expand(TABLE[4:5], {"vision": {"layer": 1}})
    with pytest.raises(ValueError, match="unknown placeholder"):
        Map("a.{block}.w", "b.{block}.w")
    with pytest.raises(ValueError, match="same placeholders"):
        Map("a.{layer}.w", "b.w")
    with pytest.raises(ValueError, match="op 'qkv' takes 3 HF tensor"):
        Map("a.w", ("q", "k"), op="qkv")
    with pytest.raises(ValueError, match="split='diag'"):
        Map("a.w", "b.w", split="diag")
    with pytest.raises(ValueError, match="names these Megatron tensors twice"):
        expand((Map("a.w", "b.w"), Map("a.w", "c.w")), {})


# -- ops ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op,n_hf,attention,shapes", [
    ("copy", 1, None, [(5, 7)]),
    ("gate_up", 2, None, [(6, 7), (6, 7)]),
    ("gate_up", 2, None, [(6,), (6,)]),
    ("qkv", 3, GQA, [(12, 5), (6, 5), (6, 5)]),
    ("qkv", 3, GQA, [(12,), (6,), (6,)]),
    ("qkv", 3, MHA, [(12, 5), (12, 5), (12, 5)]),
    ("qkv_fused", 1, MHA, [(36, 5)]),
    ("qkv_fused", 1, GQA, [(24,)]),
    ("qv_zero_k", 2, MHA, [(12,), (12,)]),
])
def test_every_op_round_trips_bit_exactly(op, n_hf, attention, shapes, dtype):
    gen = torch.Generator().manual_seed(0)
    parts = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    rule = _rule(op, n_hf, attention)
    fused = fuse(rule, parts)
    back = unfuse(rule, fused)
    assert len(back) == len(parts) and all(_same(a, b) for a, b in zip(back, parts))
    assert all(t.is_contiguous() for t in back)  # safetensors writes contiguous tensors only
    # through the state-dict functions and the names too
    state = {f"hf.{i}": p for i, p in enumerate(parts)}
    mm = hf_to_mm(state, [rule])
    assert list(mm) == ["mm.w"] and _same(mm["mm.w"], fused)
    out = mm_to_hf(mm, [rule])
    assert set(out) == set(state) and all(_same(out[k], state[k]) for k in state)


def test_qkv_rows_are_interleaved_per_kv_group():
    q, k, v = torch.arange(12.0), torch.arange(100.0, 106.0), torch.arange(200.0, 206.0)
    fused = fuse(_rule("qkv", 3, GQA), [q, k, v])
    # group g: its 2 query heads (6 rows), then its key head (3), then its value head (3)
    assert fused.tolist() == (q[:6].tolist() + k[:3].tolist() + v[:3].tolist()
                              + q[6:].tolist() + k[3:].tolist() + v[3:].tolist())


def test_qkv_fused_is_qkv_of_its_three_blocks():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(12, 5, generator=gen) for _ in range(3))
    fused_hf = torch.cat([q, k, v])  # what an HF fused attn.qkv holds: [q; k; v]
    assert _same(fuse(_rule("qkv_fused", 1, MHA), [fused_hf]), fuse(_rule("qkv", 3, MHA), [q, k, v]))


def test_qv_zero_k_inserts_a_zero_key_bias_and_drops_a_trained_one(caplog):
    gen = torch.Generator().manual_seed(2)
    q, v = torch.randn(12, generator=gen), torch.randn(12, generator=gen)
    rule = _rule("qv_zero_k", 2, MHA)
    fused = fuse(rule, [q, v])
    per_head = fused.reshape(4, 3, 3)  # heads x (q, k, v) x head_dim
    assert not per_head[:, 1].any() and torch.equal(per_head[:, 0].reshape(-1), q)
    trained = fused.clone().reshape(4, 3, 3)
    trained[:, 1] = 0.5
    with caplog.at_level(logging.INFO, logger="mm_omni.checkpoint.mapping"):
        back = unfuse(rule, trained.reshape(-1))
    assert _same(back[0], q) and _same(back[1], v)
    assert "dropping a nonzero key bias" in caplog.text


def test_state_dict_functions_refuse_what_they_cannot_map():
    rule = _rule("gate_up", 2)
    with pytest.raises(KeyError, match=r"mm.w needs \['hf.0', 'hf.1'\] but \['hf.1'\] are missing"):
        hf_to_mm({"hf.0": torch.ones(2)}, [rule])
    with pytest.raises(KeyError, match="HF tensors with no MindSpeed-MM name"):
        hf_to_mm({"stray": torch.ones(2)}, [rule])
    assert hf_to_mm({"stray": torch.ones(2)}, [rule], accounted=lambda k: k == "stray") == {}
    assert hf_to_mm({}, [rule]) == {}  # partial state dicts: rules without tensors do not fire
    with pytest.raises(KeyError, match="MindSpeed-MM tensors with no HF name"):
        mm_to_hf({"other.w": torch.ones(2)}, [rule])
    kept = mm_to_hf({"x._extra_state": None, "skip.me": torch.ones(1)}, [rule], skip=lambda k: k == "skip.me")
    assert kept == {}


# -- split rules ----------------------------------------------------------------------------------
def test_split_kinds_shard_as_megatron_expects():
    gen = torch.Generator().manual_seed(3)
    gate, up = torch.randn(8, 4, generator=gen), torch.randn(8, 4, generator=gen)
    fc1 = fuse(_rule("gate_up", 2), [gate, up])
    for rank in range(2):  # glu: rank r holds [gate_r; up_r]
        assert torch.equal(tp.shard(fc1, "glu", 2, rank), torch.cat([gate.chunk(2)[rank], up.chunk(2)[rank]]))
    q, k, v = torch.randn(12, 5, generator=gen), torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    qkv = fuse(_rule("qkv", 3, GQA), [q, k, v])
    for rank in range(2):  # row split of the interleaved qkv: rank r holds KV group r whole
        assert torch.equal(tp.shard(qkv, "row", 2, rank), torch.cat([q.chunk(2)[rank], k.chunk(2)[rank],
                                                                      v.chunk(2)[rank]]))
    w = torch.randn(6, 4, generator=gen)
    assert torch.equal(tp.shard(w, "col", 2, 1), w[:, 2:]) and tp.shard(w, "rep", 2, 1) is w
    for kind, t in (("row", qkv), ("col", w), ("glu", fc1), ("rep", w)):
        assert torch.equal(tp.merge(tp.split(t, kind, 2), kind), t), kind


# -- names ----------------------------------------------------------------------------------------
NAMES = HfNames(prefix="thinker.", spellings=(("model.language_model.", "model."), ("model.visual.", "visual.")),
                other_models=("talker.",))


def test_hf_spellings_and_prefix():
    assert NAMES.canonical("thinker.model.language_model.layers.0.w") == "model.layers.0.w"
    assert NAMES.canonical("model.visual.blocks.1.w") == "visual.blocks.1.w"
    assert NAMES.canonical("lm_head.weight") == "lm_head.weight"
    assert NAMES.from_canonical("model.layers.0.w") == "model.language_model.layers.0.w"
    assert NAMES.from_canonical("visual.blocks.1.w", "module", "thinker.") == "thinker.model.visual.blocks.1.w"
    assert NAMES.from_canonical("visual.blocks.1.w", "hub", "thinker.") == "thinker.visual.blocks.1.w"
    assert NAMES.detect_style(["talker.model.x", "thinker.model.layers.0.w"]) == ("thinker.", "hub")
    assert NAMES.detect_style(["model.visual.blocks.0.w", "lm_head.weight"]) == ("", "module")
    assert not NAMES.is_model_key("talker.model.norm.weight") and NAMES.is_model_key("thinker.lm_head.weight")
    rule = Rule("t.w", ("model.layers.0.w",))
    assert list(mm_to_hf({"t.w": torch.ones(1)}, [rule], NAMES, "module", "thinker.")) == \
        ["thinker.model.language_model.layers.0.w"]


def test_name_regex_matches_any_number_for_placeholders():
    regex = name_regex(["model.layers.{layer}.rotary.inv_freq", "audio.pos"])
    assert regex.match("model.layers.17.rotary.inv_freq") and regex.match("audio.pos")
    assert not regex.match("model.layers.x.rotary.inv_freq") and not regex.match("audio.pos.extra")
    assert not name_regex([]).match("anything")


# -- the shared stack tables ------------------------------------------------------------------------
def test_vision_table_fused_and_separate_qkv_give_the_same_megatron_tensors():
    from types import SimpleNamespace

    from mm_omni.models.vision import hf_mapping as vision

    cfg = SimpleNamespace(depth=2, num_heads=2, hidden_size=8, intermediate_size=12, spatial_merge_size=2)
    geometry = {"vision": vision.attention(cfg)}
    separate = expand(vision.table(qkv="separate"), {"vision": vision.counts(cfg)}, geometry)
    fused = expand(vision.table(qkv="fused"), {"vision": vision.counts(cfg)}, geometry)
    assert [r.mm for r in separate] == [r.mm for r in fused]
    gen = torch.Generator().manual_seed(4)
    # 8 rows each: 2 heads x head_dim 4 for q / k / v (the ops see rows only)
    state = {h: torch.randn(8, generator=gen) for r in separate for h in r.hf}
    fused_state = {h: t for h, t in state.items() if h.split(".")[-2] not in ("q", "k", "v")}
    for n in range(2):
        for leaf in ("weight", "bias"):
            fused_state[f"visual.blocks.{n}.attn.qkv.{leaf}"] = torch.cat(
                [state[f"visual.blocks.{n}.attn.{p}.{leaf}"] for p in "qkv"])
    a, b = hf_to_mm(state, separate), hf_to_mm(fused_state, fused)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    back = mm_to_hf(b, fused)
    assert set(back) == set(fused_state) and all(_same(back[k], fused_state[k]) for k in back)
