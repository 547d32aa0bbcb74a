"""The Qwen2.5-VL ViT + merger's Hugging Face <-> Megatron table (:mod:`mm_omni.checkpoint.mapping`).

Two spellings of the attention input projection exist in transformers: Qwen2.5-Omni's vision tower keeps
``attn.q`` / ``attn.k`` / ``attn.v`` apart (``qkv="separate"``), Qwen2.5-VL's holds one ``attn.qkv``
``[q; k; v]`` (``qkv="fused"``). Everything else is the same: RMSNorm ``norm1`` / ``norm2``, ``attn.proj``,
a gated MLP with biases, the patch embedding and the merger (``ln_q``, ``mlp.0``, ``mlp.2``).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

from mm_omni.checkpoint.mapping import Attention, Map
from mm_omni.checkpoint.spec import ModuleSpec

MM = "image_encoder."


def table(mm: str = MM, hf: str = "visual.", qkv: Literal["separate", "fused"] = "separate",
          module: str = "vision") -> tuple[Map, ...]:
    enc, proj = f"{mm}encoder.", f"{mm}projector."
    layer, hl = f"{enc}blocks.layers.{{layer}}.", f"{hf}blocks.{{layer}}."
    out = [Map(enc + "patch_embed.proj.weight", hf + "patch_embed.proj.weight", module=module),
           Map(proj + "layernorm.weight", hf + "merger.ln_q.weight", module=module)]
    for leaf in ("weight", "bias"):
        out += [Map(f"{proj}encoder.linear_fc1.{leaf}", f"{hf}merger.mlp.0.{leaf}", split="row", module=module),
                Map(f"{proj}encoder.linear_fc2.{leaf}", f"{hf}merger.mlp.2.{leaf}",
                    split="col" if leaf == "weight" else "rep", module=module)]
    out += [Map(layer + "input_layernorm.weight", hl + "norm1.weight", module=module),
            Map(layer + "pre_mlp_layernorm.weight", hl + "norm2.weight", module=module)]
    for leaf in ("weight", "bias"):
        row_parallel = "col" if leaf == "weight" else "rep"  # a row-parallel linear's bias is replicated
        out += [Map(layer + f"self_attention.linear_proj.{leaf}", hl + f"attn.proj.{leaf}", split=row_parallel,
                    module=module),
                Map(layer + f"mlp.linear_fc2.{leaf}", hl + f"mlp.down_proj.{leaf}", split=row_parallel,
                    module=module),
                Map(layer + f"mlp.linear_fc1.{leaf}", (hl + f"mlp.gate_proj.{leaf}", hl + f"mlp.up_proj.{leaf}"),
                    op="gate_up", split="glu", module=module)]
        if qkv == "fused":
            out.append(Map(layer + f"self_attention.linear_qkv.{leaf}", hl + f"attn.qkv.{leaf}", op="qkv_fused",
                           split="row", module=module))
        else:
            out.append(Map(layer + f"self_attention.linear_qkv.{leaf}", tuple(f"{hl}attn.{p}.{leaf}" for p in "qkv"),
                           op="qkv", split="row", module=module))
    return tuple(out)


def derived(hf: str = "visual.") -> tuple[str, ...]:
    return (f"{hf}rotary_pos_emb.inv_freq",)


def counts(vision) -> dict[str, int]:
    return {"layer": vision.depth}


def attention(vision) -> Attention:
    return Attention(vision.num_heads, vision.num_heads, vision.hidden_size // vision.num_heads)


def tp_divides(vision) -> dict[str, int]:
    return {"num_heads": vision.num_heads, "intermediate_size": vision.intermediate_size,
            "merger hidden (hidden_size*spatial_merge_size^2)": vision.hidden_size * vision.spatial_merge_size**2}


def module_spec(vision_config: Callable[[Any], Any], name: str = "vision", mm: str = MM) -> ModuleSpec:
    """The ViT + merger's layout spec; ``vision_config`` picks the vision config out of the model's."""
    return ModuleSpec(name, mm, f"{mm}encoder.blocks.layers.", first=(f"{mm}encoder.patch_embed.",),
                      last=(f"{mm}projector.",), pp_option="vit_pp_layers", tp_option="vit_tp_size",
                      counts=lambda c: counts(vision_config(c)), tp_divides=lambda c: tp_divides(vision_config(c)),
                      attention=lambda c: attention(vision_config(c)), config_section=mm.rstrip("."),
                      layers_section=f"{mm}vision_encoder")
