"""``LocalTokenDispatcher`` (the sync-free dispatch when every expert is local) against megatron's own
dispatchers in the same MoE decoder, fp32 on the CPU: logits, loss and every parameter gradient bit for bit
(the same permutation, the same combine). The decoder's MoE layers get it at EP=1; configurations it does not
cover keep megatron's."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import init_megatron
from tests.parity.test_text_moe import build_hf, build_mm, hf_text_config, make_batch, run_mm


@pytest.fixture(scope="module")
def moe_model():
    init_megatron()
    text = hf_text_config(mlp_only_layers=[1])  # a dense layer between the MoE ones
    hf_model, lm_head = build_hf(text)
    return text, build_mm(text, hf_model, lm_head)


def _moe_layers(model):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    return [m for m in model.modules() if isinstance(m, MoELayer)]


@pytest.mark.parametrize("megatron_kind", ["alltoall", "allgather"])
def test_equals_megatron_dispatchers_bit_for_bit(moe_model, megatron_kind):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import (
        MoEAllGatherTokenDispatcher,
        MoEAlltoAllTokenDispatcher,
    )

    from mm_omni.models.common.token_dispatch import LocalTokenDispatcher

    text, model = moe_model
    layers = _moe_layers(model)
    assert len(layers) == 2 and all(isinstance(m.token_dispatcher, LocalTokenDispatcher) for m in layers)
    ids, labels, pos = make_batch(text.vocab_size, b=3, s=16)
    local = run_mm(model, input_ids=ids, position_ids=pos, labels=labels)
    kind = {"alltoall": MoEAlltoAllTokenDispatcher, "allgather": MoEAllGatherTokenDispatcher}[megatron_kind]
    ours = [m.token_dispatcher for m in layers]
    try:
        for m in layers:
            m.token_dispatcher = kind(m.num_local_experts, m.local_expert_indices, config=m.config,
                                      pg_collection=get_default_pg_collection())
        theirs = run_mm(model, input_ids=ids, position_ids=pos, labels=labels)
    finally:
        for m, d in zip(layers, ours):
            m.token_dispatcher = d
    logits, loss, aux, grads = local
    assert torch.equal(logits, theirs[0]) and torch.equal(loss, theirs[1]) and torch.equal(aux, theirs[2])
    assert grads.keys() == theirs[3].keys()
    for name, grad in grads.items():
        assert torch.equal(grad, theirs[3][name]), name


@pytest.mark.parametrize("field, value", [("moe_expert_capacity_factor", 1.0), ("moe_shared_expert_overlap", True),
                                          ("moe_token_dispatcher_type", "flex")])
def test_configurations_it_does_not_cover_keep_megatrons(moe_model, field, value):
    from mm_omni.models.common.token_dispatch import local_dispatch_applies

    _, model = moe_model
    layer = _moe_layers(model)[0]
    assert local_dispatch_applies(layer.config, layer.token_dispatcher)
    config = layer.config
    saved = getattr(config, field)
    try:
        object.__setattr__(config, field, value)
        assert not local_dispatch_applies(config, layer.token_dispatcher)
    finally:
        object.__setattr__(config, field, saved)


def test_expert_parallel_keeps_megatrons(moe_model):
    from mm_omni.models.common.token_dispatch import local_dispatch_applies

    _, model = moe_model
    layer = _moe_layers(model)[0]
    dispatcher = layer.token_dispatcher
    saved = dispatcher.ep_size
    try:
        dispatcher.ep_size = 2
        assert not local_dispatch_applies(layer.config, dispatcher)
    finally:
        dispatcher.ep_size = saved
