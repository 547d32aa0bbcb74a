"""The M-RoPE Qwen2 decoder's Hugging Face <-> Megatron table (:mod:`mm_omni.checkpoint.mapping`).

Shared by every family with this decoder; a family composes it with its prefixes (``mm``: where the
decoder sits in our model, ``hf``: where transformers' decoder sits in the canonical spelling). The
functions of a ``text_config`` (``counts``, ``attention``, ``tp_divides``) read transformers' Qwen2
text-config field names.
"""

from __future__ import annotations

from typing import Any, Callable

from mm_omni.checkpoint.mapping import Attention, Map
from mm_omni.checkpoint.spec import ModuleSpec, Tie

MM = "text_decoder."


def table(tied: bool, mm: str = MM, hf: str = "model.", lm_head: str = "lm_head.weight",
          module: str = "text") -> tuple[Map, ...]:
    """Embedding, final norm, output layer (left out when ``tied``: the embedding serves), and per layer
    the norms, fused QKV with bias, o_proj, gate/up and down."""
    layer, hl = f"{mm}decoder.layers.{{layer}}.", f"{hf}layers.{{layer}}."
    out = [Map(f"{mm}embedding.word_embeddings.weight", f"{hf}embed_tokens.weight", split="row", module=module),
           Map(f"{mm}decoder.final_layernorm.weight", f"{hf}norm.weight", module=module)]
    if not tied:
        out.append(Map(f"{mm}output_layer.weight", lm_head, split="row", module=module))
    out += [Map(layer + "input_layernorm.weight", hl + "input_layernorm.weight", module=module),
            Map(layer + "pre_mlp_layernorm.weight", hl + "post_attention_layernorm.weight", module=module),
            Map(layer + "self_attention.linear_proj.weight", hl + "self_attn.o_proj.weight", split="col",
                module=module),
            Map(layer + "mlp.linear_fc2.weight", hl + "mlp.down_proj.weight", split="col", module=module),
            Map(layer + "mlp.linear_fc1.weight", (hl + "mlp.gate_proj.weight", hl + "mlp.up_proj.weight"),
                op="gate_up", split="glu", module=module)]
    out += [Map(layer + f"self_attention.linear_qkv.{leaf}",
                tuple(f"{hl}self_attn.{p}_proj.{leaf}" for p in "qkv"), op="qkv", split="row", module=module)
            for leaf in ("weight", "bias")]
    return tuple(out)


def derived(hf: str = "model.") -> tuple[str, ...]:
    """Rotary ``inv_freq`` buffers some checkpoints hold (computed from the config, never trained)."""
    return (f"{hf}rotary_emb.inv_freq", f"{hf}layers.{{layer}}.self_attn.rotary_emb.inv_freq")


def counts(text) -> dict[str, int]:
    return {"layer": text.num_hidden_layers}


def attention(text) -> Attention:
    heads = text.num_attention_heads
    return Attention(heads, text.num_key_value_heads, getattr(text, "head_dim", None) or text.hidden_size // heads)


def tp_divides(text) -> dict[str, int]:
    return {"num_attention_heads": text.num_attention_heads, "num_key_value_heads": text.num_key_value_heads,
            "intermediate_size": text.intermediate_size, "vocab_size": text.vocab_size}


def module_spec(text_config: Callable[[Any], Any], name: str = "text", mm: str = MM) -> ModuleSpec:
    """The decoder's layout spec; ``text_config`` picks the text config out of the converted model's."""
    return ModuleSpec(name, mm, f"{mm}decoder.layers.", first=(f"{mm}embedding.",),
                      last=(f"{mm}decoder.final_layernorm.", f"{mm}output_layer."),
                      pp_option="llm_pp_layers", tp_option="tp_size",
                      counts=lambda c: counts(text_config(c)), tp_divides=lambda c: tp_divides(text_config(c)),
                      attention=lambda c: attention(text_config(c)), config_section=mm.rstrip("."))


def tie(flag: Callable[[Any], bool], mm: str = MM, lm_head: str = "lm_head.weight") -> Tie:
    """The tied output layer: ``lm_head`` is the embedding when ``flag(sub-config)``."""
    return Tie(flag, lm_head, f"{mm}embedding.word_embeddings.weight", f"{mm}output_layer.weight")


def moe_table(tied: bool, mm: str = MM, hf: str = "model.", lm_head: str = "lm_head.weight",
              module: str = "text") -> tuple[Map, ...]:
    """The Qwen3-MoE form (every layer a mixture of experts): embedding, final norm, output layer (left out
    when ``tied``), and per layer the norms, fused QKV without bias, the per-head q/k norms, o_proj, the
    router and each expert's gate/up and down, in the checkpoint's per-expert spelling
    (``mlp.experts.{expert}.gate_proj.weight``; transformers fuses them into ``gate_up_proj`` only in memory).
    ``{expert}`` is the global expert index, megatron's ``local_experts`` index at expert-parallel size 1."""
    layer, hl = f"{mm}decoder.layers.{{layer}}.", f"{hf}layers.{{layer}}."
    expert, he = f"{layer}mlp.experts.local_experts.{{expert}}.", f"{hl}mlp.experts.{{expert}}."
    out = [Map(f"{mm}embedding.word_embeddings.weight", f"{hf}embed_tokens.weight", split="row", module=module),
           Map(f"{mm}decoder.final_layernorm.weight", f"{hf}norm.weight", module=module)]
    if not tied:
        out.append(Map(f"{mm}output_layer.weight", lm_head, split="row", module=module))
    out += [Map(layer + "input_layernorm.weight", hl + "input_layernorm.weight", module=module),
            Map(layer + "pre_mlp_layernorm.weight", hl + "post_attention_layernorm.weight", module=module),
            Map(layer + "self_attention.linear_qkv.weight", tuple(f"{hl}self_attn.{p}_proj.weight" for p in "qkv"),
                op="qkv", split="row", module=module),
            Map(layer + "self_attention.q_layernorm.weight", hl + "self_attn.q_norm.weight", module=module),
            Map(layer + "self_attention.k_layernorm.weight", hl + "self_attn.k_norm.weight", module=module),
            Map(layer + "self_attention.linear_proj.weight", hl + "self_attn.o_proj.weight", split="col",
                module=module),
            Map(layer + "mlp.router.weight", hl + "mlp.gate.weight", module=module),
            Map(expert + "linear_fc1.weight", (he + "gate_proj.weight", he + "up_proj.weight"), op="gate_up",
                split="glu", module=module),
            Map(expert + "linear_fc2.weight", he + "down_proj.weight", split="col", module=module)]
    return tuple(out)


def moe_counts(text) -> dict[str, int]:
    """Placeholder ranges of :func:`moe_table`, read from a transformers Qwen3-MoE text config; a config with
    dense layers among the MoE ones (``mlp_only_layers``, ``decoder_sparse_step`` > 1) is refused: the
    table maps every layer as a mixture of experts."""
    dense = [i for i in range(text.num_hidden_layers)
             if i in (text.mlp_only_layers or []) or (i + 1) % text.decoder_sparse_step]
    if dense:
        raise ValueError(f"mlp_only_layers={text.mlp_only_layers}, decoder_sparse_step={text.decoder_sparse_step}: "
                         f"layers {dense} are dense, but the Qwen3-MoE key table maps every layer as a mixture "
                         "of experts; use mlp_only_layers=[] and decoder_sparse_step=1")
    return {"layer": text.num_hidden_layers, "expert": text.num_experts}


def moe_tp_divides(text) -> dict[str, int]:
    return {"num_attention_heads": text.num_attention_heads, "num_key_value_heads": text.num_key_value_heads,
            "moe_intermediate_size": text.moe_intermediate_size, "vocab_size": text.vocab_size}
