"""Qwen3-Omni thinker: its Hugging Face names around the shared stack tables.

The checkpoint (``save_pretrained`` of ``Qwen3OmniMoeForConditionalGeneration``, the Hub's 30B-A3B) holds
the thinker under ``thinker.``, in the "hub" spelling the tables use: ``model.layers.N...`` with one tensor
per expert (``mlp.experts.E.{gate,up,down}_proj.weight``), ``model.embed_tokens``, ``model.norm``,
``lm_head``, ``visual.*``, ``audio_tower.*``. transformers' in-memory ``state_dict()`` spells them
``model.language_model.*``, ``model.visual.*``, ``model.audio_tower.*`` and fuses each layer's experts into
``mlp.experts.gate_up_proj`` / ``down_proj``; :func:`checkpoint_state` turns those shapes back into the
stored per-expert ones.

``talker.*`` (with its code predictor ``talker.code_predictor.*``) and ``code2wav.*`` are not the thinker's:
never converted, carried over from the HF files.
"""

from __future__ import annotations

import dataclasses
import re

from mm_omni.checkpoint.mapping import HfNames, Map
from mm_omni.models.audio_aut import hf_mapping as audio
from mm_omni.models.qwen3_omni_moe.hf_config import thinker_of
from mm_omni.models.text import hf_mapping as text
from mm_omni.models.vision_qwen3 import hf_mapping as vision

NAMES = HfNames(prefix="thinker.",
                spellings=(("model.language_model.", "model."), ("model.visual.", "visual."),
                           ("model.audio_tower.", "audio_tower.")),
                other_models=("talker.", "code2wav."))

# megatron's name of a layer's experts in the MoE table (text.moe_table): "...layers.N.<this>E.linear_fc1"
EXPERT_PREFIX = "mlp.experts.local_experts."


def _text_module():
    """The MoE decoder's layout spec: the dense spec with the MoE counts / TP divisors, experts split by EP."""
    dense = text.module_spec(lambda t: t.text_config)
    return dataclasses.replace(dense, counts=lambda t: text.moe_counts(t.text_config),
                               tp_divides=lambda t: text.moe_tp_divides(t.text_config), expert_prefix=EXPERT_PREFIX)


# in checkpoint order of the pipeline: the encoders, then the decoder they feed
MODULES = (vision.module_spec(lambda t: t.vision_config), audio.module_spec(lambda t: t.audio_config),
           _text_module())
DERIVED = audio.derived() + vision.derived() + text.derived()


def is_tied(thinker) -> bool:
    """transformers ties the thinker's lm_head by the thinker config's flag (30B-A3B: False)."""
    return bool(getattr(thinker_of(thinker), "tie_word_embeddings", False))


TIE = text.tie(is_tied)


def table(thinker) -> tuple[Map, ...]:
    """Every tensor of the thinker: the MoE text decoder, the vision encoder with its deepstack mergers, audio."""
    thinker = thinker_of(thinker)
    return (text.moe_table(is_tied(thinker)) + vision.table(len(thinker.vision_config.deepstack_visual_indexes))
            + audio.table())


def checkpoint_state(thinker, state: dict) -> dict:
    """Canonical names of transformers' in-memory ``state_dict()`` (real or meta tensors) -> the checkpoint's:
    each layer's fused ``mlp.experts.gate_up_proj`` [E, 2I, h] (``[gate; up]`` per expert) / ``down_proj``
    [E, h, I] as E tensors per projection (views of the fused ones). A checkpoint's own per-expert names
    pass through unchanged."""
    out = {}
    for name, t in state.items():
        base, _, leaf = name.rpartition(".")
        if not base.endswith(".mlp.experts") or leaf not in ("gate_up_proj", "down_proj"):
            out[name] = t
            continue
        for e in range(t.shape[0]):
            if leaf == "down_proj":
                out[f"{base}.{e}.down_proj.weight"] = t[e]
            else:
                half = t.shape[1] // 2
                out[f"{base}.{e}.gate_proj.weight"] = t[e, :half]
                out[f"{base}.{e}.up_proj.weight"] = t[e, half:]
    return out


_STORED_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
_FUSED = {("gate", "up"): "gate_up_proj", ("down",): "down_proj"}  # rows [gate; up], as checkpoint_state splits


def fused_parameter(hf_names) -> tuple[str, int] | None:
    """One expert's stored weights (``...mlp.experts.E.gate_proj.weight`` + ``up_proj``, or ``down_proj``) ->
    (transformers' fused parameter ``...mlp.experts.gate_up_proj`` / ``down_proj``, E); None for the rest."""
    found = [_STORED_EXPERT.match(n) for n in hf_names]
    if not found or not all(found) or len({(m.group(1), m.group(2)) for m in found}) != 1:
        return None
    leaf = _FUSED.get(tuple(m.group(3) for m in found))
    return None if leaf is None else (f"{found[0].group(1)}.{leaf}", int(found[0].group(2)))
