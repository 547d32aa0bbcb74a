"""Qwen2.5-Omni's layout rules: module prefixes, first/last-stage tensors, TP split kinds, checks."""

from __future__ import annotations

import re
from functools import lru_cache

import torch

from converters.common.layout import ModuleSpec
from converters.common.tp import SplitKind
from converters.qwen2_5_omni import keymap

MODULES = (
    ModuleSpec("vision", "image_encoder.", "image_encoder.encoder.blocks.layers.",
               first=("image_encoder.encoder.patch_embed.",), last=("image_encoder.projector.",)),
    ModuleSpec("audio", "audio_encoder.", "audio_encoder.encoder.blocks.layers.",
               first=("audio_encoder.encoder.conv", "audio_encoder.encoder.audio_bos_eos_token."),
               last=("audio_encoder.encoder.proj.", "audio_encoder.encoder.ln_post.")),
    ModuleSpec("text", "text_decoder.", "text_decoder.decoder.layers.",
               first=("text_decoder.embedding.",),
               last=("text_decoder.decoder.final_layernorm.", "text_decoder.output_layer.")),
)
ENCODERS = ("vision", "audio")
# which CLI list / TP option names each module, for error messages
PP_OPTION = {"text": "llm_pp_layers", "vision": "vit_pp_layers", "audio": "audio_pp_layers"}
TP_OPTION = {"text": "tp_size", "vision": "vit_tp_size", "audio": "audio_tp_size"}

_ROW = re.compile(
    r"(text_decoder\.(embedding\.word_embeddings|output_layer)\.weight"
    r"|\.self_attention\.linear_qkv\.(weight|bias)"
    r"|image_encoder\.projector\.encoder\.linear_fc1\.(weight|bias)"
    r"|audio_encoder\..*\.mlp\.linear_fc1\.(weight|bias))$")
_GLU = re.compile(r"(text_decoder\..*\.mlp\.linear_fc1\.weight|image_encoder\.encoder\..*\.mlp\.linear_fc1\.(weight|bias))$")
_COL = re.compile(r"(\.self_attention\.linear_proj\.weight|\.mlp\.linear_fc2\.weight"
                  r"|image_encoder\.projector\.encoder\.linear_fc2\.weight)$")


def split_kind(mm_name: str) -> SplitKind:
    """MindSpeed-MM's TP rule for one tensor (row-parallel biases and norms are replicated)."""
    if _GLU.search(mm_name):
        return "glu"
    if _ROW.search(mm_name):
        return "row"
    if _COL.search(mm_name):
        return "col"
    return "rep"


def module_of(mm_name: str) -> str:
    return next(m.name for m in MODULES if mm_name.startswith(m.prefix))


def layer_counts(thinker) -> dict[str, int]:
    return {"text": thinker.text_config.num_hidden_layers, "vision": thinker.vision_config.depth,
            "audio": thinker.audio_config.encoder_layers}


def tp_errors(thinker, tp: dict[str, int]) -> list[str]:
    """Every TP size that does not divide what it must split, as 'option=value: reason' lines."""
    text, vision, audio = thinker.text_config, thinker.vision_config, thinker.audio_config
    need = {
        "text": {"num_attention_heads": text.num_attention_heads, "num_key_value_heads": text.num_key_value_heads,
                 "intermediate_size": text.intermediate_size, "vocab_size": text.vocab_size},
        "vision": {"num_heads": vision.num_heads, "intermediate_size": vision.intermediate_size,
                   "merger hidden (hidden_size*spatial_merge_size^2)": vision.hidden_size * vision.spatial_merge_size**2},
        "audio": {"encoder_attention_heads": audio.encoder_attention_heads, "encoder_ffn_dim": audio.encoder_ffn_dim},
    }
    errors = []
    for module, sizes in need.items():
        for what, n in sizes.items():
            if n % tp[module]:
                errors.append(f"{TP_OPTION[module]}={tp[module]} does not divide {module} {what}={n}")
    top = max(tp.values())
    for module, size in tp.items():
        if top % size:
            errors.append(f"{TP_OPTION[module]}={size} does not divide the largest TP size {top} "
                          "(smaller module TP sizes are replicated cyclically over the largest)")
    return errors


@lru_cache(maxsize=4)
def _meta_thinker_state(thinker_json: str):
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniThinkerConfig
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration

    import json
    cfg = Qwen2_5OmniThinkerConfig(**json.loads(thinker_json))
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = Qwen2_5OmniThinkerForConditionalGeneration(cfg)
    return {keymap.to_canonical(k): v for k, v in model.state_dict().items()}


def hf_meta_state(thinker) -> dict[str, torch.Tensor]:
    """Canonical (hub-spelled) HF thinker names -> meta tensors of the shapes transformers builds."""
    return _meta_thinker_state(thinker.to_json_string(use_diff=False))


def mm_meta_state(thinker) -> dict[str, torch.Tensor]:
    """Every full (TP1) MM tensor as a meta tensor: the shapes a checkpoint must merge back to."""
    return keymap.hf_to_mm(hf_meta_state(thinker), thinker)
