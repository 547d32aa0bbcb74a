"""The LoRA adapters of a Megatron checkpoint -> a PEFT adapter for the Hugging Face thinker
(``Qwen2_5OmniThinkerForConditionalGeneration``, the model LLaMA-Factory and ms-swift train).

Megatron fuses linears that HF keeps apart; their adapters split exactly:

- ``linear_qkv`` (rows interleaved per query group) -> q/k/v_proj: the rows of ``W + s B A`` that
  are q's are ``W_q + s B_q A``, so ``B`` splits like the weight (per group, q/k/v rows) and the one
  ``A`` is each projection's ``A`` (copied: peft keeps one per module);
- ``linear_fc1`` (``[gate; up]``) -> gate_proj / up_proj: ``B`` in halves, ``A`` shared, alike;
- every other adapted linear maps one-to-one (o_proj, down_proj, the merger, lm_head, ...).

So each HF module computes ``W x + s B_hf A_hf x``, its rows of the merged export, and PEFT on
hf_dir's weights gives the merged export's logits, provided hf_dir *is* the base the adapters were
trained on: one adapted base weight of the checkpoint is compared with hf_dir's to catch another.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor

from converters.common.fuse import split_gate_up, split_groups
from converters.common.hf_io import HFSource
from converters.common.mm_reader import MMReader
from converters.common.mm_writer import cast
from converters.common.peft_export import write_peft_adapter
from converters.qwen2_5_omni import keymap

log = logging.getLogger(__name__)


def hf_adapters(reader: MMReader, thinker) -> dict[str, tuple[Tensor, Tensor]]:
    """Hub-spelled HF module name (``model.layers.0.self_attn.q_proj``) -> its ``(A, B)``."""
    table = {r.mm: r for r in keymap.rules(thinker)}
    out = {}
    for base in reader.adapted():
        rule = table[base]
        a, b = reader.lora_pair(base)
        if rule.op == "copy":
            parts = [b]
        elif rule.op == "gate_up":
            parts = list(split_gate_up(b))
        elif rule.op == "qkv":
            parts = split_groups(b, rule.groups, rule.rows)
        else:
            raise ValueError(f"{base}: a LoRA adapter on a '{rule.op}' tensor has no PEFT form")
        out.update({hf.removesuffix(".weight"): (a, part) for hf, part in zip(rule.hf, parts)})
    return out


def check_same_base(reader: MMReader, thinker, src: HFSource, prefix: str, style: str) -> None:
    """The first adapted weight's base equals hf_dir's (after casting both to the coarser dtype)."""
    base = reader.adapted()[0]
    ours = keymap.mm_to_hf({base: reader.get(base, merged=False)}, thinker, style="hub")
    for name, tensor in ours.items():
        key = keymap.from_canonical(name, style, prefix)
        theirs = src.get(key)
        coarse = max((tensor.dtype, theirs.dtype), key=lambda d: torch.finfo(d).eps)
        if tensor.shape != theirs.shape or not torch.equal(tensor.to(coarse), theirs.to(coarse)):
            raise ValueError(f"save_lora_as_peft: the base weight {base} of {reader.tag_dir} differs from {key} "
                             f"of hf_dir={src.dir}; a PEFT adapter is applied to hf_dir's weights, so hf_dir must "
                             "be the checkpoint the training base was converted from (or export the merged model: "
                             "save_lora_as_peft false)")


def write_peft(reader: MMReader, thinker, src: HFSource, prefix: str, style: str, dst: Path, cfg) -> int:
    """Write ``dst/adapter_config.json`` + ``adapter_model.safetensors``; returns the number of HF modules."""
    if not reader.adapted():
        raise ValueError(f"save_lora_as_peft: {reader.tag_dir} holds no LoRA adapters; give the LoRA run's "
                         "checkpoint (an adapter-only save goes in lora_load_dir, its base in mm_dir)")
    check_same_base(reader, thinker, src, prefix, style)
    # transformers' module names (what peft itself writes): the checkpoint's hub names would load only in part
    # (peft's renaming for transformers 5 maps the text decoder's, not the encoders')
    adapters = {keymap.from_canonical(m, "module"): (cast(a, cfg.dtype), cast(b, cfg.dtype))
                for m, (a, b) in hf_adapters(reader, thinker).items()}
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
