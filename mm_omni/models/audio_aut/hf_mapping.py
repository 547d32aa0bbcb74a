"""The AuT audio tower's Hugging Face <-> Megatron table (:mod:`mm_omni.checkpoint.mapping`).

The layers are spelled as Whisper's (:data:`mm_omni.models.audio.hf_mapping._LAYER`), but ``k_proj`` has a
bias here, so the fused ``linear_qkv.bias`` is a plain ``qkv`` of three biases. The front end
(``conv2d1..3``, ``conv_out``) and the head (``ln_post``, ``proj1``, ``proj2``) are replicated; the
sinusoidal ``positional_embedding`` is computed from the config (:func:`derived`). :func:`hf_state_to_mm`
converts a state dict (or its gradients) through the table.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from mm_omni.checkpoint.mapping import Attention, Map, expand, hf_to_mm
from mm_omni.checkpoint.spec import ModuleSpec
from mm_omni.models.audio.hf_mapping import _LAYER

MM = "audio_encoder."
MODULE = "audio"


def table(mm: str = MM, hf: str = "audio_tower.", module: str = MODULE) -> tuple[Map, ...]:
    enc = f"{mm}encoder."
    layer, hl = f"{enc}blocks.layers.{{layer}}.", f"{hf}layers.{{layer}}."
    out = [Map(f"{enc}conv_out.weight", f"{hf}conv_out.weight", module=module)]
    for leaf in ("weight", "bias"):
        out += [Map(f"{enc}{name}.{leaf}", f"{hf}{name}.{leaf}", module=module)
                for name in ("conv2d1", "conv2d2", "conv2d3", "ln_post", "proj1", "proj2")]
    for leaf in ("weight", "bias"):
        out += [Map(f"{layer}{ours}.{leaf}", f"{hl}{theirs}.{leaf}",
                    split=split if leaf == "weight" or split == "row" else "rep", module=module)
                for theirs, ours, split in _LAYER]
        out.append(Map(f"{layer}self_attention.linear_qkv.{leaf}",
                       tuple(f"{hl}self_attn.{p}_proj.{leaf}" for p in "qkv"), op="qkv", split="row", module=module))
    return tuple(out)


def derived(hf: str = "audio_tower.") -> tuple[str, ...]:
    return (f"{hf}positional_embedding.positional_embedding",)


def counts(audio) -> dict[str, int]:
    return {"layer": audio.encoder_layers}


def attention(audio) -> Attention:
    heads = audio.encoder_attention_heads
    return Attention(heads, heads, audio.d_model // heads)


def tp_divides(audio) -> dict[str, int]:
    return {"encoder_attention_heads": audio.encoder_attention_heads, "encoder_ffn_dim": audio.encoder_ffn_dim}


def hf_state_to_mm(audio, state: Mapping, mm: str = MM, hf: str = "audio_tower.") -> dict:
    """transformers' tensors (names with the ``hf`` prefix) -> ours (``mm`` prefix), through :func:`table`;
    ``audio`` is the HF audio config. A tensor the table does not name raises."""
    rules = expand(table(mm, hf), {MODULE: counts(audio)}, {MODULE: attention(audio)})
    return hf_to_mm(state, rules, accounted=lambda name: name in derived(hf))


def module_spec(audio_config: Callable[[Any], Any], name: str = MODULE, mm: str = MM) -> ModuleSpec:
    """The AuT tower's layout spec; ``audio_config`` picks the audio config out of the model's."""
    enc = f"{mm}encoder."
    return ModuleSpec(name, mm, f"{enc}blocks.layers.", first=(f"{enc}conv2d", f"{enc}conv_out."),
                      last=(f"{enc}ln_post.", f"{enc}proj1.", f"{enc}proj2."), pp_option="audio_pp_layers",
                      tp_option="audio_tp_size", counts=lambda c: counts(audio_config(c)),
                      tp_divides=lambda c: tp_divides(audio_config(c)),
                      attention=lambda c: attention(audio_config(c)),
                      config_section=mm.rstrip("."), layers_section=f"{mm}audio_encoder")
