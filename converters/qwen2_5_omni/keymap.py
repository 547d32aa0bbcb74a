"""KEYMAP READY — Qwen2.5-Omni thinker: Hugging Face names <-> MindSpeed-MM (Megatron) names.

The single source of truth for names. Whole thinker, TP1/PP1, global layer numbering.

HF names come in two spellings, both accepted, each with or without a ``thinker.`` prefix:

* "hub" (what ``save_pretrained`` writes and the Hub's 7B holds): ``model.layers.N...``,
  ``model.embed_tokens``, ``model.norm``, ``lm_head``, ``visual.*``, ``audio_tower.*``;
* "module" (``state_dict()`` of transformers >= 5): ``model.language_model.*``, ``model.visual.*``,
  ``model.audio_tower.*``, ``lm_head``.

``talker.*`` / ``token2wav.*`` are not the thinker's: ``hf_to_mm`` ignores them. Any other key that is
neither mapped nor a known derived buffer (rotary ``inv_freq``, Whisper's sinusoidal
``positional_embedding``: recomputed from the config, never trained) raises.

Partial state dicts (one module, or gradients) convert: every rule whose tensors are present fires;
a fused rule with only some of its parts present raises.

Decision on the audio key bias: Whisper's ``k_proj`` has no bias; the fused ``linear_qkv.bias`` gets a
zero key slice. ``mm_to_hf`` drops that slice even when training made it nonzero, because it is
exactly harmless: ``q.(k + b) = q.k + q.b`` adds the same constant to every score of a query, and
softmax is shift-invariant per query. A nonzero slice is logged, not an error.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Literal, Mapping

import torch
from torch import Tensor

from converters.common.fuse import cat_gate_up, interleave_groups, split_gate_up, split_groups

log = logging.getLogger(__name__)

Style = Literal["module", "hub"]

# module spelling -> hub spelling (canonical form used inside this file)
_MODULE_TO_HUB = (("model.language_model.", "model."), ("model.visual.", "visual."),
                  ("model.audio_tower.", "audio_tower."))
_HUB_TO_MODULE = (("visual.", "model.visual."), ("audio_tower.", "model.audio_tower."),
                  ("model.", "model.language_model."))
NON_THINKER_PREFIXES = ("talker.", "token2wav.")
# Buffers derived from the config (not trained); present in some older checkpoints. Accounted for
# here, skipped on the way in; the CLI keeps the original HF file's copy on the way out.
DERIVED_BUFFERS = re.compile(
    r"^(audio_tower\.positional_embedding(\.positional_embedding)?"
    r"|visual\.rotary_pos_emb\.inv_freq"
    r"|model\.rotary_emb\.inv_freq"
    r"|model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq)$")

TEXT, VISION, AUDIO = "text_decoder.", "image_encoder.", "audio_encoder."


@dataclass(frozen=True)
class Rule:
    """One MM tensor and the HF tensors (canonical hub names) it is made of."""

    mm: str
    hf: tuple[str, ...]
    op: Literal["copy", "qkv", "qv_zero_k", "gate_up"] = "copy"
    groups: int = 0
    rows: tuple[int, ...] = ()  # rows per group of each part, for splitting qkv back


def _thinker(cfg):
    return getattr(cfg, "thinker_config", cfg)  # a full Qwen2_5OmniConfig works too


def is_tied(thinker_config) -> bool:
    """transformers ties the thinker's lm_head by the *thinker* config's flag (7B: False)."""
    return bool(getattr(_thinker(thinker_config), "tie_word_embeddings", False))


def _text_rules(text, tied: bool) -> list[Rule]:
    heads, groups = text.num_attention_heads, text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    rows = (heads // groups * head_dim, head_dim, head_dim)
    out = [Rule(f"{TEXT}embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
           Rule(f"{TEXT}decoder.final_layernorm.weight", ("model.norm.weight",))]
    if not tied:
        out.append(Rule(f"{TEXT}output_layer.weight", ("lm_head.weight",)))
    for n in range(text.num_hidden_layers):
        hf, mm = f"model.layers.{n}.", f"{TEXT}decoder.layers.{n}."
        out += [Rule(mm + "input_layernorm.weight", (hf + "input_layernorm.weight",)),
                Rule(mm + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",)),
                Rule(mm + "self_attention.linear_proj.weight", (hf + "self_attn.o_proj.weight",)),
                Rule(mm + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",)),
                Rule(mm + "mlp.linear_fc1.weight", (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight"),
                     "gate_up")]
        out += [Rule(mm + f"self_attention.linear_qkv.{leaf}",
                     tuple(f"{hf}self_attn.{p}_proj.{leaf}" for p in "qkv"), "qkv", groups, rows)
                for leaf in ("weight", "bias")]
    return out


def _vision_rules(vision) -> list[Rule]:
    heads = vision.num_heads
    head_dim = vision.hidden_size // heads
    enc, proj = f"{VISION}encoder.", f"{VISION}projector."
    out = [Rule(enc + "patch_embed.proj.weight", ("visual.patch_embed.proj.weight",)),
           Rule(proj + "layernorm.weight", ("visual.merger.ln_q.weight",))]
    for leaf in ("weight", "bias"):
        out += [Rule(f"{proj}encoder.linear_fc1.{leaf}", (f"visual.merger.mlp.0.{leaf}",)),
                Rule(f"{proj}encoder.linear_fc2.{leaf}", (f"visual.merger.mlp.2.{leaf}",))]
    for n in range(vision.depth):
        hf, mm = f"visual.blocks.{n}.", f"{enc}blocks.layers.{n}."
        out += [Rule(mm + "input_layernorm.weight", (hf + "norm1.weight",)),
                Rule(mm + "pre_mlp_layernorm.weight", (hf + "norm2.weight",))]
        for leaf in ("weight", "bias"):
            out += [Rule(mm + f"self_attention.linear_proj.{leaf}", (hf + f"attn.proj.{leaf}",)),
                    Rule(mm + f"mlp.linear_fc2.{leaf}", (hf + f"mlp.down_proj.{leaf}",)),
                    Rule(mm + f"mlp.linear_fc1.{leaf}", (hf + f"mlp.gate_proj.{leaf}", hf + f"mlp.up_proj.{leaf}"),
                         "gate_up"),
                    Rule(mm + f"self_attention.linear_qkv.{leaf}", tuple(f"{hf}attn.{p}.{leaf}" for p in "qkv"),
                         "qkv", heads, (head_dim,) * 3)]
    return out


def _audio_rules(audio) -> list[Rule]:
    heads = audio.encoder_attention_heads
    head_dim = audio.d_model // heads
    enc = f"{AUDIO}encoder."
    out = [Rule(enc + "audio_bos_eos_token.weight", ("audio_tower.audio_bos_eos_token.weight",))]
    for leaf in ("weight", "bias"):
        out += [Rule(enc + f"{name}.{leaf}", (f"audio_tower.{name}.{leaf}",))
                for name in ("conv1", "conv2", "ln_post", "proj")]
    renames = (("self_attn_layer_norm", "input_layernorm"), ("final_layer_norm", "pre_mlp_layernorm"),
               ("self_attn.out_proj", "self_attention.linear_proj"), ("fc1", "mlp.linear_fc1"),
               ("fc2", "mlp.linear_fc2"))
    for n in range(audio.encoder_layers):
        hf, mm = f"audio_tower.layers.{n}.", f"{enc}blocks.layers.{n}."
        for leaf in ("weight", "bias"):
            out += [Rule(f"{mm}{b}.{leaf}", (f"{hf}{a}.{leaf}",)) for a, b in renames]
        out += [Rule(mm + "self_attention.linear_qkv.weight",
                     tuple(f"{hf}self_attn.{p}_proj.weight" for p in "qkv"), "qkv", heads, (head_dim,) * 3),
                Rule(mm + "self_attention.linear_qkv.bias", (hf + "self_attn.q_proj.bias", hf + "self_attn.v_proj.bias"),
                     "qv_zero_k", heads, (head_dim,) * 3)]
    return out


def rules(thinker_config) -> list[Rule]:
    """Every tensor of the thinker, in checkpoint order (text, vision, audio)."""
    cfg = _thinker(thinker_config)
    return (_text_rules(cfg.text_config, is_tied(cfg)) + _vision_rules(cfg.vision_config)
            + _audio_rules(cfg.audio_config))


def split_prefix(key: str) -> tuple[str, str]:
    """``thinker.model.x`` -> (``thinker.``, ``model.x``)."""
    return ("thinker.", key[len("thinker."):]) if key.startswith("thinker.") else ("", key)


def to_canonical(local: str) -> str:
    """A prefix-free HF thinker key, in either spelling -> the hub spelling."""
    for mod, hub in _MODULE_TO_HUB:
        if local.startswith(mod):
            return hub + local[len(mod):]
    return local


def from_canonical(hub: str, style: Style = "module", prefix: str = "") -> str:
    if style == "module":
        for h, mod in _HUB_TO_MODULE:
            if hub.startswith(h):
                return prefix + mod + hub[len(h):]
    return prefix + hub


def detect_style(keys) -> tuple[str, Style]:
    """(prefix, style) of an HF state dict's thinker keys; module style wins on any ``model.language_model.``."""
    prefix, style = "", "hub"
    for key in keys:
        pre, local = split_prefix(key)
        if local.startswith(NON_THINKER_PREFIXES):
            continue
        prefix = pre
        if local.startswith(("model.language_model.", "model.visual.", "model.audio_tower.")):
            return prefix, "module"
    return prefix, style


def is_thinker_key(key: str) -> bool:
    return not split_prefix(key)[1].startswith(NON_THINKER_PREFIXES)


def hf_to_mm(hf_state_dict: Mapping[str, Tensor], thinker_config) -> dict[str, Tensor]:
    """HF thinker tensors (either spelling, ``thinker.`` prefix or not) -> MM names, TP1/PP1."""
    canon: dict[str, Tensor] = {}
    for key, val in hf_state_dict.items():
        local = split_prefix(key)[1]
        if local.startswith(NON_THINKER_PREFIXES):
            continue  # talker / token2wav: the CLI carries them over from the HF files
        canon[to_canonical(local)] = val
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for rule in rules(thinker_config):
        present = [h for h in rule.hf if h in canon]
        if not present:
            continue
        if len(present) != len(rule.hf):
            missing = sorted(set(rule.hf) - set(present))
            raise KeyError(f"{rule.mm} needs {list(rule.hf)} but {missing} are missing from the HF state dict")
        parts = [canon[h] for h in rule.hf]
        used.update(rule.hf)
        out[rule.mm] = _fuse(rule, parts)
    unused = [k for k in canon if k not in used and not _accounted(k, thinker_config)]
    if unused:
        raise KeyError(f"HF thinker tensors with no MindSpeed-MM name (config mismatch?): {sorted(unused)[:20]}"
                       f"{' ...' if len(unused) > 20 else ''}")
    return out


def _accounted(canon_key: str, thinker_config) -> bool:
    if DERIVED_BUFFERS.match(canon_key):
        return True
    # tied: lm_head.weight is the embedding under a second name; MM keeps only word_embeddings
    return canon_key == "lm_head.weight" and is_tied(thinker_config)


def _fuse(rule: Rule, parts: list[Tensor]) -> Tensor:
    if rule.op == "copy":
        return parts[0]
    if rule.op == "gate_up":
        return cat_gate_up(*parts)
    if rule.op == "qkv":
        return interleave_groups(parts, rule.groups)
    q, v = parts  # qv_zero_k: Whisper has no key bias; a zero one is exact (see module docstring)
    return interleave_groups([q, torch.zeros_like(q), v], rule.groups)


def mm_to_hf(mm_state_dict: Mapping[str, Tensor], thinker_config, *, style: Style = "module",
             prefix: str = "") -> dict[str, Tensor]:
    """Inverse of :func:`hf_to_mm`. ``style``/``prefix`` pick the output spelling (default: the
    ``state_dict()`` of a bare transformers thinker; the CLI passes the original checkpoint's)."""
    table = {r.mm: r for r in rules(thinker_config)}
    tied = is_tied(thinker_config)
    out: dict[str, Tensor] = {}
    unknown = []
    for key, val in mm_state_dict.items():
        rule = table.get(key)
        if rule is None:
            if key.endswith("._extra_state") or (tied and key == f"{TEXT}output_layer.weight"):
                continue  # megatron's TE/fp8 metadata; or the tied copy of the embedding (PP > 1)
            unknown.append(key)
            continue
        for name, tensor in zip(rule.hf, _unfuse(rule, val)):
            out[from_canonical(name, style, prefix)] = tensor
    if unknown:
        raise KeyError(f"MindSpeed-MM tensors with no HF name (config mismatch?): {sorted(unknown)[:20]}")
    return out


def _unfuse(rule: Rule, val: Tensor) -> list[Tensor]:
    if rule.op == "copy":
        return [val]
    if rule.op == "gate_up":
        return list(split_gate_up(val))
    q, k, v = split_groups(val, rule.groups, rule.rows)
    if rule.op == "qkv":
        return [q, k, v]
    if torch.count_nonzero(k):
        log.info("%s: dropping a nonzero audio key bias (max |b| = %.3g); exact, softmax is shift-invariant",
                 rule.mm, k.abs().max().item())
    return [q, v]


def expected_mm_keys(thinker_config) -> list[str]:
    """Every MM tensor name a complete thinker has (TP1/PP1, global numbering)."""
    return [r.mm for r in rules(thinker_config)]
