"""Contract tests every registered model family passes (parametrised over ``mm_omni.registry.families()``).

Registry keys resolve back to the family, its pieces load, its model.json round-trips through its schema,
its HF key map is an exact bijection (random HF weights -> Megatron names -> HF names, bit-exact), and its
model with those weights equals transformers' (fp32, logits and every gradient) on a text row. Per-family
tests add what needs the family's data: media parity, TP2 / PP2 torchrun runs, the first-step loss through
the data pipeline, the converter's command line.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from mm_omni import registry
from tests.fixtures.families import FIXTURES
from tests.helpers import init_megatron, rel_err

FAMILIES = [f.name for f in registry.families()]


def _load(ref: str):
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _hf_model(name: str, seed: int = 0):
    cfg = FIXTURES[name].tiny_hf_config()
    torch.manual_seed(seed)
    model = _load(FIXTURES[name].hf_model)(cfg).float()
    with torch.no_grad():  # non-default values everywhere (norm weights are ones at init)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return cfg, model


def test_every_family_has_test_fixtures():
    missing = [n for n in FAMILIES if n not in FIXTURES]
    assert not missing, f"families without tests/fixtures/families.py entries: {missing}"
    assert {"qwen2_5_omni", "qwen2_5_vl"} <= set(FAMILIES)


@pytest.mark.parametrize("name", FAMILIES)
def test_registry_keys_lead_back_to_the_family(name):
    family = registry.by_name(name)
    for template in family.templates:
        assert registry.for_template(template) is family
        assert family.load("template").name == template
    for model_type in family.hf_model_types:
        assert registry.for_hf_model_type(model_type) is family
    for top, decoder in family.model_ids:
        assert registry.for_model_json({"model_id": top, "text_decoder": {"model_id": decoder}}) is family
    converter = family.load("converter")
    assert converter.__name__ == family.converter and all(hasattr(converter, c) for c in ("hf_to_mm", "mm_to_hf",
                                                                                       "resplit"))
    assert callable(family.load("task")) and callable(family.load("flops"))
    assert name in registry.describe()


@pytest.mark.parametrize("name", FAMILIES)
def test_model_json_round_trips_through_the_schema(name):
    family = registry.by_name(name)
    cfg = family.load("config_from_hf")(FIXTURES[name].tiny_hf_config())
    data = cfg.model_dump(mode="json", exclude_none=True)
    assert registry.for_model_json(data) is family
    assert family.load_model_config(data) == cfg


@pytest.mark.parametrize("name", FAMILIES)
def test_hf_key_map_is_an_exact_bijection(name):
    from converters.common.convert import expected_mm_keys, hf_state_to_mm, mm_state_to_hf

    spec = registry.by_name(name).load("converter").spec
    cfg, model = _hf_model(name)
    hf = model.state_dict()
    mm = hf_state_to_mm(spec, cfg, hf)
    assert sorted(mm) == sorted(expected_mm_keys(spec, cfg))
    back = mm_state_to_hf(spec, cfg, mm)
    tied = getattr(cfg, "tie_word_embeddings", False)
    stored = spec.checkpoint_state(spec.sub_config(cfg), hf)  # the checkpoint's spelling (per-expert tensors)
    want = {k: v for k, v in stored.items() if not (tied and k.endswith("lm_head.weight"))}
    assert set(back) <= set(want)
    not_mapped = [k for k in want if k not in back]
    assert not not_mapped, f"HF tensors the key map drops: {not_mapped[:5]}"
    for key, tensor in back.items():
        assert torch.equal(tensor, want[key]), key


@pytest.mark.parametrize("name", FAMILIES)
def test_text_row_equals_transformers(name):
    """Same weights through the key map; logits and every parameter's gradient, fp32."""
    from converters.common.convert import hf_state_to_mm

    init_megatron()
    family = registry.by_name(name)
    cfg, hf_model = _hf_model(name, seed=1)
    mm_cfg = family.load("config_from_hf")(cfg)
    ours = family.load("model")(mm_cfg).float()
    mm = hf_state_to_mm(family.load("converter").spec, cfg, hf_model.state_dict())
    result = ours.load_state_dict(mm, strict=False)
    assert not result.unexpected_keys and all(k.endswith("_extra_state") for k in result.missing_keys)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 900, (2, 24), generator=gen)
    labels = ids.clone()
    labels[:, :5] = -100
    hf_out = hf_model(input_ids=ids, labels=labels)
    hf_out.loss.backward()
    out = ours(input_ids=ids, labels=labels, position_ids=torch.arange(24).expand(3, 2, 24), return_logits=True)
    out.loss.backward()
    assert rel_err(out.logits.float(), hf_out.logits) < 1e-5
    assert rel_err(out.loss, hf_out.loss) < 1e-5
    hf_grads = hf_state_to_mm(family.load("converter").spec, cfg,
                              {k: p.grad for k, p in hf_model.named_parameters() if p.grad is not None})
    checked = 0
    for key, param in ours.named_parameters():
        if key in hf_grads and param.grad is not None and hf_grads[key].abs().sum() > 0:
            assert rel_err(param.grad, hf_grads[key]) < 1e-5, key
            checked += 1
    assert checked > 10
