"""The LoRA adapters of a Megatron checkpoint -> a PEFT adapter for the Hugging Face model (the model
LLaMA-Factory and ms-swift train, e.g. ``Qwen2_5OmniThinkerForConditionalGeneration``).

Megatron fuses linears that HF keeps apart; their adapters split exactly, by the table's op:

- ``qkv`` (rows interleaved per query group) -> q/k/v: the rows of ``W + s B A`` that are q's are
  ``W_q + s B_q A``, so ``B`` splits like the weight (per group, q/k/v rows) and the one ``A`` is each
  projection's ``A`` (copied: peft keeps one per module); ``qkv_fused`` -> one ``[q; k; v]`` module whose
  ``B`` is reordered like the weight;
- ``gate_up`` (``[gate; up]``) -> gate / up: ``B`` in halves, ``A`` shared, alike;
- ``copy``: one-to-one (o_proj, down_proj, the merger, lm_head, ...).

So each HF module computes ``W x + s B_hf A_hf x``, its rows of the merged export, and PEFT on
hf_dir's weights gives the merged export's logits, provided hf_dir *is* the base the adapters were
trained on: one adapted base weight of the checkpoint is compared with hf_dir's to catch another.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from converters.common.hf_io import HFSource
from converters.common.mm_reader import MMReader
from converters.common.mm_writer import cast
from converters.common.peft_export import write_peft_adapter
from converters.common.plan import Plan
from mm_omni.checkpoint.mapping import unfuse

log = logging.getLogger(__name__)
_ROW_OPS = ("copy", "gate_up", "qkv", "qkv_fused")  # ops that only move or split rows: B follows the weight


def hf_adapters(plan: Plan, reader: MMReader) -> dict[str, tuple[Tensor, Tensor]]:
    """Canonical HF module name (``model.layers.0.self_attn.q_proj``) -> its ``(A, B)``."""
    out = {}
    for base in reader.adapted():
        rule = plan.by_mm[base]
        if rule.op not in _ROW_OPS:
            raise ValueError(f"{base}: a LoRA adapter on a '{rule.op}' tensor has no PEFT form")
        a, b = reader.lora_pair(base)
        out.update({hf.removesuffix(".weight"): (a, part) for hf, part in zip(rule.hf, unfuse(rule, b))})
    return out


def check_same_base(plan: Plan, reader: MMReader, src: HFSource, prefix: str, style: str) -> None:
    """The first adapted weight's base equals hf_dir's (after casting both to the coarser dtype)."""
    base = reader.adapted()[0]
    ours = plan.mm_to_hf({base: reader.get(base, merged=False)}, style="hub")
    for name, tensor in ours.items():
        key = plan.names.from_canonical(name, style, prefix)
        theirs = src.get(key)
        coarse = max((tensor.dtype, theirs.dtype), key=lambda d: torch.finfo(d).eps)
        if tensor.shape != theirs.shape or not torch.equal(tensor.to(coarse), theirs.to(coarse)):
            raise ValueError(f"save_lora_as_peft: the base weight {base} of {reader.tag_dir} differs from {key} "
                             f"of hf_dir={src.dir}; a PEFT adapter is applied to hf_dir's weights, so hf_dir must "
                             "be the checkpoint the training base was converted from (or export the merged model: "
                             "save_lora_as_peft false)")


def write_peft(plan: Plan, reader: MMReader, src: HFSource, prefix: str, style: str, dst: Path, cfg) -> int:
    """Write ``dst/adapter_config.json`` + ``adapter_model.safetensors``; returns the number of HF modules."""
    if not reader.adapted():
        raise ValueError(f"save_lora_as_peft: {reader.tag_dir} holds no LoRA adapters; give the LoRA run's "
                         "checkpoint (an adapter-only save goes in lora_load_dir, its base in mm_dir)")
    check_same_base(plan, reader, src, prefix, style)
    # transformers' module names (what peft itself writes): the checkpoint's hub names would load only in part
    # (peft's renaming for transformers 5 maps the text decoder's, not the encoders')
    adapters = {plan.names.from_canonical(m, "module"): (cast(a, cfg.dtype), cast(b, cfg.dtype))
                for m, (a, b) in hf_adapters(plan, reader).items()}
    ranks = sorted({a.shape[0] for a, _ in adapters.values()})
    if len(ranks) != 1:
        raise ValueError(f"{reader.tag_dir}: LoRA adapters of ranks {ranks}; a PEFT adapter here has one rank")
    r = ranks[0]
    args = reader.lora_args or {}
    dropout = float((args.get("lora_dropout") if isinstance(args, dict) else getattr(args, "lora_dropout", 0.0))
                    or 0.0)
    # peft scales by lora_alpha / r: alpha = scale * r gives the merge's scale whatever r the args say
    write_peft_adapter(dst, adapters, r, reader.lora_scale * r, dropout, str(Path(cfg.hf_config.hf_dir).resolve()))
    return len(adapters)
