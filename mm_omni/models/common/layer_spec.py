"""megatron-core layer specs shared by the three stacks (no TransformerEngine needed).

A layer is megatron-core's ``TransformerLayer``: norm -> ``SelfAttention`` (fused QKV column-parallel
linear, our :class:`CoreAttention`, row-parallel output projection) -> residual -> norm -> ``MLP``
(column/row-parallel linears; SwiGLU or plain GELU from the ``TransformerConfig``) -> residual.
The norm class (RMSNorm or LayerNorm) also comes from ``config.normalization``.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from mm_omni.models.common.attention import CoreAttention


def transformer_layer_spec(attn_mask_type: AttnMaskType) -> ModuleSpec:
    """Pre-norm transformer layer; ``causal`` for the decoder, ``no_mask`` for the encoders."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": attn_mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=CoreAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=mlp_spec(),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def mlp_spec() -> ModuleSpec:
    """Column-parallel fc1 (gate and up fused when ``gated_linear_unit``) -> act -> row-parallel fc2."""
    return ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
    )
