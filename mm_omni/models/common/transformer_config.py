"""model.json module config (pydantic) -> megatron-core ``TransformerConfig``.

One translation for every stack: the keys MindSpeed-MM puts on each module (norm type, activation,
gated linear unit, biases, heads / query groups, dropout, dtype, recompute) map here, and a stack
passes what only it knows (``num_query_groups``, ``add_qkv_bias``, ``kv_channels``, parallel sizes)
as overrides. Fusions that need TransformerEngine / apex kernels (gradient-accumulation fusion, RoPE
fusion, persistent LayerNorm, masked-softmax fusion) are off: our attention core, norms and rotary
don't use them, and they would break the CPU mode. megatron's ``torch.compile``d bias-dropout-add and
bias-SwiGLU (exact math) are on where the platform is CUDA; no other activation is ever fused.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from mm_omni.config.model import _ModuleCommon
from mm_omni.platform import get_platform

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# megatron.core.activations has quick_gelu and fast_gelu with these formulas, but wrapped in
# torch.compile at import: on a CPU that is a C++ build of ~15 s at the first call. Plain torch here.
def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU (transformers' ``gelu_pytorch_tanh``)."""
    return F.gelu(x, approximate="tanh")


def fast_gelu(x: torch.Tensor) -> torch.Tensor:
    """MindSpeed-MM's / megatron's ``fast_gelu`` (transformers' ``gelu_fast``): tanh GELU in this formula."""
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(1.702 x)`` (transformers' ``quick_gelu``)."""
    return x * torch.sigmoid(1.702 * x)


# model.json ``activation_func`` -> the function; "gelu" is the exact erf GELU (transformers' nn.GELU / "gelu").
# A gated MLP applies it as act(gate) * up.
ACTIVATIONS: dict[str, Callable] = {
    "silu": F.silu, "gelu": F.gelu, "gelu_tanh": gelu_tanh, "fast_gelu": fast_gelu, "quick_gelu": quick_gelu,
}


def module_dtype(cfg: _ModuleCommon) -> torch.dtype:
    """Parameter dtype of a module: ``params_dtype``, or bf16/fp16 when the module's flag says so."""
    if cfg.bf16 and cfg.fp16:
        raise ValueError(f"{cfg.model_id}: bf16 and fp16 are both true; set at most one")
    if cfg.bf16:
        return torch.bfloat16
    if cfg.fp16:
        return torch.float16
    return DTYPES[cfg.params_dtype]


def _fuse_swiglu(cfg: _ModuleCommon) -> bool:
    """megatron's fused (bias +) SwiGLU (a ``torch.compile``d kernel, exact math) on CUDA; model.json's
    ``bias_activation_fusion: false`` turns it off. Every other activation stays unfused: megatron's fused
    GELU is the tanh approximation (not the exact GELU), and it fuses nothing else we use."""
    if get_platform().name != "cuda" or cfg.bias_activation_fusion is False:
        return False
    return cfg.gated_linear_unit and cfg.activation_func == "silu"


def megatron_transformer_config(cfg: _ModuleCommon, **overrides) -> TransformerConfig:
    """The megatron ``TransformerConfig`` of one module's transformer blocks.

    ``overrides`` win over the module config (e.g. ``num_query_groups``, ``add_qkv_bias``,
    ``kv_channels``, ``tensor_model_parallel_size``, ``sequence_parallel``).
    """
    heads = overrides.get("num_attention_heads", cfg.num_attention_heads)
    if not heads or cfg.hidden_size % heads:
        raise ValueError(f"{cfg.model_id}.num_attention_heads={heads} must be set and divide "
                         f"hidden_size={cfg.hidden_size}")
    if cfg.activation_func not in ACTIVATIONS:
        raise ValueError(f"{cfg.model_id}.activation_func={cfg.activation_func!r}: use one of {sorted(ACTIVATIONS)}")
    dtype = module_dtype(cfg)
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size or 4 * cfg.hidden_size,
        num_attention_heads=heads,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.layernorm_epsilon,
        gated_linear_unit=cfg.gated_linear_unit,
        activation_func=ACTIVATIONS[cfg.activation_func],
        add_bias_linear=True if cfg.add_bias_linear is None else cfg.add_bias_linear,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        recompute_granularity=cfg.recompute_granularity,
        recompute_method=cfg.recompute_method,
        recompute_num_layers=cfg.recompute_num_layers,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=_fuse_swiglu(cfg),
        bias_dropout_fusion=get_platform().name == "cuda",
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
