"""mm_omni.megatron_compat: our layer spec builds the same way on every supported megatron-core release."""

import logging

import megatron.core
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_config import TransformerConfig

from mm_omni.models.common.layer_spec import AlignedRowParallelLinear, transformer_layer_spec
from tests.helpers import init_megatron


def test_layer_builds_its_mlp_from_the_spec_as_is(caplog):
    """The MLP entry is in the form this release's TransformerLayer calls: megatron-core then neither
    rewrites the (shared) spec in place nor warns about it, and the MLP gets megatron's TP group."""
    init_megatron()
    config = TransformerConfig(num_layers=2, hidden_size=16, ffn_hidden_size=24, num_attention_heads=2,
                               gated_linear_unit=True, use_cpu_initialization=True)
    spec = transformer_layer_spec(AttnMaskType.causal)
    entry = spec.submodules.mlp
    with caplog.at_level(logging.WARNING):
        layers = [spec.module(config, spec.submodules, layer_number=n) for n in (1, 2)]
    assert spec.submodules.mlp is entry, f"megatron-core {megatron.core.__version__} rewrote the layer spec's mlp"
    assert not [r for r in caplog.records if r.name.startswith("megatron")], [r.getMessage() for r in caplog.records]
    for layer in layers:
        assert type(layer.mlp) is MLP
        assert isinstance(layer.mlp.linear_fc2, AlignedRowParallelLinear)
        assert layer.mlp.linear_fc1.weight.shape == (2 * 24, 16)  # gate and up fused
        assert layer.mlp.tp_group is parallel_state.get_tensor_model_parallel_group()
