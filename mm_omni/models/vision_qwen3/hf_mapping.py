"""The Qwen3-VL-style ViT + mergers' Hugging Face <-> Megatron table (:mod:`mm_omni.checkpoint.mapping`).

transformers' names: ``patch_embed.proj`` (Conv3d with bias), ``pos_embed`` (the learned table),
``blocks.N.{norm1,norm2}`` (LayerNorms), ``blocks.N.attn.qkv`` (one ``[q; k; v]`` tensor) and
``attn.proj``, ``blocks.N.mlp.linear_fc{1,2}`` (ungated), ``merger.{ln_q,mlp.0,mlp.2}`` and one
``merger_list.K`` per deepstack layer (Qwen3-Omni's spelling; Qwen3-VL's is ``deepstack_merger_list.K``:
``deepstack=``). :func:`hf_state_to_mm` converts a state dict (or its gradients) through the table.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from mm_omni.checkpoint.mapping import Attention, Map, expand, hf_to_mm
from mm_omni.checkpoint.spec import ModuleSpec

MM = "image_encoder."
MODULE = "vision"


def _merger(mm: str, hf: str, module: str) -> list[Map]:
    out = []
    for leaf in ("weight", "bias"):
        out += [Map(f"{mm}layernorm.{leaf}", f"{hf}ln_q.{leaf}", module=module),
                Map(f"{mm}encoder.linear_fc1.{leaf}", f"{hf}mlp.0.{leaf}", split="row", module=module),
                Map(f"{mm}encoder.linear_fc2.{leaf}", f"{hf}mlp.2.{leaf}", split="col" if leaf == "weight" else "rep",
                    module=module)]
    return out


def table(num_deepstack: int, mm: str = MM, hf: str = "visual.", deepstack: str = "merger_list.",
          module: str = MODULE) -> tuple[Map, ...]:
    """Every tensor of the encoder with ``num_deepstack`` deepstack mergers."""
    enc = f"{mm}encoder."
    layer, hl = f"{enc}blocks.layers.{{layer}}.", f"{hf}blocks.{{layer}}."
    out = [Map(enc + "patch_embed.proj.weight", hf + "patch_embed.proj.weight", module=module),
           Map(enc + "patch_embed.proj.bias", hf + "patch_embed.proj.bias", module=module),
           Map(enc + "pos_embed.weight", hf + "pos_embed.weight", module=module)]
    out += _merger(f"{mm}projector.", f"{hf}merger.", module)
    for k in range(num_deepstack):
        out += _merger(f"{mm}deepstack_projectors.{k}.", f"{hf}{deepstack}{k}.", module)
    for leaf in ("weight", "bias"):
        row_parallel = "col" if leaf == "weight" else "rep"  # a row-parallel linear's bias is replicated
        out += [Map(layer + f"input_layernorm.{leaf}", hl + f"norm1.{leaf}", module=module),
                Map(layer + f"pre_mlp_layernorm.{leaf}", hl + f"norm2.{leaf}", module=module),
                Map(layer + f"self_attention.linear_qkv.{leaf}", hl + f"attn.qkv.{leaf}", op="qkv_fused", split="row",
                    module=module),
                Map(layer + f"self_attention.linear_proj.{leaf}", hl + f"attn.proj.{leaf}", split=row_parallel,
                    module=module),
                Map(layer + f"mlp.linear_fc1.{leaf}", hl + f"mlp.linear_fc1.{leaf}", split="row", module=module),
                Map(layer + f"mlp.linear_fc2.{leaf}", hl + f"mlp.linear_fc2.{leaf}", split=row_parallel,
                    module=module)]
    return tuple(out)


def derived(hf: str = "visual.") -> tuple[str, ...]:
    """Buffers computed from the config, never stored by us."""
    return (f"{hf}rotary_pos_emb.inv_freq", f"{hf}rotary_pos_emb.original_inv_freq")


def counts(vision) -> dict[str, int]:
    return {"layer": vision.depth}


def attention(vision) -> Attention:
    return Attention(vision.num_heads, vision.num_heads, vision.hidden_size // vision.num_heads)


def tp_divides(vision) -> dict[str, int]:
    return {"num_heads": vision.num_heads, "intermediate_size": vision.intermediate_size,
            "merger hidden (hidden_size*spatial_merge_size^2)": vision.hidden_size * vision.spatial_merge_size**2}


def hf_state_to_mm(vision, state: Mapping, mm: str = MM, hf: str = "visual.", deepstack: str = "merger_list."
                   ) -> dict:
    """transformers' tensors (names with the ``hf`` prefix) -> ours (``mm`` prefix), through :func:`table`;
    ``vision`` is the HF vision config. A tensor the table does not name raises."""
    rules = expand(table(len(vision.deepstack_visual_indexes), mm, hf, deepstack), {MODULE: counts(vision)},
                   {MODULE: attention(vision)})
    return hf_to_mm(state, rules, accounted=lambda name: name in derived(hf))


def module_spec(vision_config: Callable[[Any], Any], name: str = MODULE, mm: str = MM) -> ModuleSpec:
    """The ViT + mergers' layout spec; ``vision_config`` picks the vision config out of the model's."""
    return ModuleSpec(name, mm, f"{mm}encoder.blocks.layers.",
                      first=(f"{mm}encoder.patch_embed.", f"{mm}encoder.pos_embed."),
                      last=(f"{mm}projector.", f"{mm}deepstack_projectors."), pp_option="vit_pp_layers",
                      tp_option="vit_tp_size", counts=lambda c: counts(vision_config(c)),
                      tp_divides=lambda c: tp_divides(vision_config(c)),
                      attention=lambda c: attention(vision_config(c)),
                      config_section=mm.rstrip("."), layers_section=f"{mm}vision_encoder")
