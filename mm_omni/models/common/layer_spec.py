"""megatron-core layer specs shared by the three stacks (no TransformerEngine needed).

A layer is megatron-core's ``TransformerLayer``: norm -> ``SelfAttention`` (fused QKV column-parallel
linear, our :class:`CoreAttention`, row-parallel output projection) -> residual -> norm -> ``MLP``
(column/row-parallel linears; SwiGLU or plain GELU from the ``TransformerConfig``) -> residual.
The norm class (RMSNorm or LayerNorm) also comes from ``config.normalization``; it is :class:`Norm`, which,
unlike megatron's ``WrappedTorchNorm``, accepts sequence parallelism.

Two switches of the ``TransformerConfig`` change a layer: ``qk_layernorm`` adds a :class:`Norm` over each
query and key head (before the rotary), and ``num_moe_experts`` with ``moe_layer_freq`` replaces the MLP
of the chosen layers by megatron's ``MoELayer`` (top-k router, token dispatcher, experts of
:mod:`mm_omni.models.common.experts`).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer, TransformerLayerSubmodules, get_transformer_layer_offset,
)

from mm_omni.megatron_compat import moe_router_without_transformer_engine, transformer_layer_mlp
from mm_omni.models.common.attention import CoreAttention
from mm_omni.models.common.experts import GroupedExperts
from mm_omni.models.common.token_dispatch import MoELayer


class Norm:
    """torch's ``RMSNorm`` / ``LayerNorm`` (``config.normalization``) that also works under sequence parallel.

    With sequence parallelism each tensor-parallel rank normalises its own slice of the sequence, so
    the norm's (replicated) weight and bias get only a partial gradient there. megatron-core sums
    those over the TP group in ``finalize_model_grads`` (``_allreduce_non_tensor_model_parallel_grads``)
    for every parameter marked ``sequence_parallel = True`` (what its TE / Apex norms do); this marks
    them the same way. megatron's ``WrappedTorchNorm`` refuses sequence parallelism instead.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization={config.normalization!r}: use 'RMSNorm' or 'LayerNorm'")
        for p in norm.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        return norm


def transformer_block_spec(config: TransformerConfig, attn_mask_type: AttnMaskType,
                           vp_stage: Optional[int] = None) -> TransformerBlockSubmodules:
    """This stage's layers plus the block's final norm, both with :class:`Norm` (megatron builds the
    final norm of a plain layer spec with its own ``WrappedTorchNorm``)."""
    qk_norm = bool(config.qk_layernorm)
    dense = transformer_layer_spec(attn_mask_type, qk_layernorm=qk_norm)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    if config.num_moe_experts is None:
        return TransformerBlockSubmodules(layer_specs=[dense] * num_layers, layer_norm=Norm)
    moe = transformer_layer_spec(attn_mask_type, qk_layernorm=qk_norm, moe=True)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    pattern = moe_layer_pattern(config)[offset:offset + num_layers]
    return TransformerBlockSubmodules(layer_specs=[moe if is_moe else dense for is_moe in pattern], layer_norm=Norm)


def moe_layer_pattern(config: TransformerConfig) -> list[bool]:
    """Which layers (0-based, over all pipeline stages) have a mixture of experts: megatron's
    ``moe_layer_freq``, an int k (every k-th layer from layer 0) or a 0/1 list with one entry per layer."""
    if config.num_moe_experts is None:
        return [False] * config.num_layers
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [i % freq == 0 for i in range(config.num_layers)]
    if len(freq) != config.num_layers:
        raise ValueError(f"moe_layer_freq={freq}: a list needs one entry per layer ({config.num_layers})")
    return [bool(f) for f in freq]


class AdditionLayer(TransformerLayer):
    """megatron's ``TransformerLayer`` that adds block ``i`` of its ``context`` ([s, b, k * h]) to its output,
    ``i`` = its global 0-based index, when ``i < k``; without a context it is the plain layer.

    The decoder layers have no cross-attention (megatron's ``IdentityOp``), so ``context`` is otherwise
    unused: it reaches every layer, is an input of the activation-recompute checkpoints and comes back
    out of each layer unchanged, which makes it the carrier of per-layer additions (deepstack features)."""

    def forward(self, *args, **kwargs):
        output, context = super().forward(*args, **kwargs)
        index = self.layer_number - 1
        if context is not None and index < context.shape[-1] // output.shape[-1]:
            h = output.shape[-1]
            output = output + context[..., index * h:(index + 1) * h].to(output.dtype)
        return output, context


def transformer_layer_spec(attn_mask_type: AttnMaskType, qk_layernorm: bool = False, moe: bool = False) -> ModuleSpec:
    """Pre-norm transformer layer; ``causal`` for the decoder, ``no_mask`` for the encoders. ``qk_layernorm``:
    a norm over each query and key head; ``moe``: a mixture of experts instead of the dense MLP."""
    return ModuleSpec(
        module=AdditionLayer if attn_mask_type == AttnMaskType.causal else TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=Norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": attn_mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=CoreAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=Norm if qk_layernorm else IdentityOp,
                    k_layernorm=Norm if qk_layernorm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=Norm,
            mlp=moe_spec() if moe else transformer_layer_mlp(mlp_spec().submodules),
            mlp_bda=get_bias_dropout_add,
        ),
    )


class AlignedRowParallelLinear(RowParallelLinear):
    """``RowParallelLinear`` whose GEMMs see an input width that is a multiple of 8 elements.

    The vision MLP's width is 3420: rows of 6840 bytes are not 16-byte aligned, so cuBLAS falls back
    from Hopper's kernels to sm80 ones, measured at about half the speed (28% of the vision encoder's
    GPU time on 8k patches). Here the input and the weight are zero-padded by a few columns on the
    fly; the padded products add zeros, the weight's gradient is the padded one's, sliced. The
    parameter keeps its real shape (checkpoints, converter, TP shards unchanged).
    """

    def __init__(self, input_size: int, *args, **kwargs):
        super().__init__(input_size, *args, **kwargs)
        width = self.weight.shape[1]  # this TP rank's share of the input width
        pad = -width % 8
        if pad:
            impl = self._forward_impl

            def padded_forward_impl(input, weight, **kw):
                pad_cols = torch.nn.functional.pad
                return impl(input=pad_cols(input, (0, pad)), weight=pad_cols(weight, (0, pad)), **kw)

            self._forward_impl = padded_forward_impl


def mlp_spec() -> ModuleSpec:
    """Column-parallel fc1 (gate and up fused when ``gated_linear_unit``) -> act -> row-parallel fc2."""
    return ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=AlignedRowParallelLinear),
    )


def moe_spec() -> ModuleSpec:
    """megatron's ``MoELayer``: its ``TopKRouter`` (weight ``router.weight``) and token dispatcher (a sync-free
    one when every expert is local: ``common.token_dispatch``), and
    :class:`GroupedExperts` (expert ``i`` of this rank is ``experts.local_experts.i``, a gated MLP whose
    linears megatron marks as expert parameters: reduced over the expert-data-parallel group)."""
    moe_router_without_transformer_engine()
    experts = ModuleSpec(module=GroupedExperts,
                         submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
    return ModuleSpec(module=MoELayer, submodules=MoESubmodules(experts=experts))
