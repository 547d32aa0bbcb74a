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
