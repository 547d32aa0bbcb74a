"""The Whisper-style audio tower's Hugging Face <-> Megatron table (:mod:`mm_omni.checkpoint.mapping`).

Whisper's ``k_proj`` has no bias: the fused ``linear_qkv.bias`` gets a zero key slice (``qv_zero_k``; exact,
see :mod:`mm_omni.checkpoint.mapping`). The sinusoidal ``positional_embedding`` is computed from the
config and never trained (:func:`derived`).
"""

from __future__ import annotations

from typing import Any, Callable

from mm_omni.checkpoint.mapping import Attention, Map
from mm_omni.checkpoint.spec import ModuleSpec

MM = "audio_encoder."
# HF layer module -> ours, and the TP split of its weight (its bias is split alike only for column-parallel)
_LAYER = (("self_attn_layer_norm", "input_layernorm", "rep"), ("final_layer_norm", "pre_mlp_layernorm", "rep"),
          ("self_attn.out_proj", "self_attention.linear_proj", "col"), ("fc1", "mlp.linear_fc1", "row"),
          ("fc2", "mlp.linear_fc2", "col"))


def table(mm: str = MM, hf: str = "audio_tower.", module: str = "audio") -> tuple[Map, ...]:
    enc = f"{mm}encoder."
    layer, hl = f"{enc}blocks.layers.{{layer}}.", f"{hf}layers.{{layer}}."
    out = [Map(enc + "audio_bos_eos_token.weight", hf + "audio_bos_eos_token.weight", module=module)]
    for leaf in ("weight", "bias"):
        out += [Map(f"{enc}{name}.{leaf}", f"{hf}{name}.{leaf}", module=module)
                for name in ("conv1", "conv2", "ln_post", "proj")]
    for leaf in ("weight", "bias"):
        out += [Map(f"{layer}{ours}.{leaf}", f"{hl}{theirs}.{leaf}",
                    split=split if leaf == "weight" or split == "row" else "rep", module=module)
                for theirs, ours, split in _LAYER]
    out += [Map(layer + "self_attention.linear_qkv.weight", tuple(f"{hl}self_attn.{p}_proj.weight" for p in "qkv"),
                op="qkv", split="row", module=module),
            Map(layer + "self_attention.linear_qkv.bias", (hl + "self_attn.q_proj.bias", hl + "self_attn.v_proj.bias"),
                op="qv_zero_k", split="row", module=module)]
    return tuple(out)


def derived(hf: str = "audio_tower.") -> tuple[str, ...]:
    return (f"{hf}positional_embedding", f"{hf}positional_embedding.positional_embedding")


def counts(audio) -> dict[str, int]:
    return {"layer": audio.encoder_layers}


def attention(audio) -> Attention:
    heads = audio.encoder_attention_heads
    return Attention(heads, heads, audio.d_model // heads)


def tp_divides(audio) -> dict[str, int]:
    return {"encoder_attention_heads": audio.encoder_attention_heads, "encoder_ffn_dim": audio.encoder_ffn_dim}


def module_spec(audio_config: Callable[[Any], Any], name: str = "audio", mm: str = MM) -> ModuleSpec:
    """The audio tower's layout spec; ``audio_config`` picks the audio config out of the model's."""
    enc = f"{mm}encoder."
    return ModuleSpec(name, mm, f"{enc}blocks.layers.", first=(f"{enc}conv", f"{enc}audio_bos_eos_token."),
                      last=(f"{enc}proj.", f"{enc}ln_post."), pp_option="audio_pp_layers", tp_option="audio_tp_size",
                      counts=lambda c: counts(audio_config(c)), tp_divides=lambda c: tp_divides(audio_config(c)),
                      attention=lambda c: attention(audio_config(c)), config_section=mm.rstrip("."),
                      layers_section=f"{mm}audio_encoder")
