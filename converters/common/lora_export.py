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


def hf_adapters(plan: Plan, reader: MMReader) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, dict]]:
    """``(modules, fused)``: canonical HF module name (``model.layers.0.self_attn.q_proj``) -> its ``(A, B)``;
    canonical name of a transformers parameter that holds experts fused (``...mlp.experts.gate_up_proj``) ->
    ``{expert: (A, B)}``, each expert's ``B`` rows in the fused parameter's order (``[gate; up]`` like
    megatron's ``linear_fc1``)."""
    modules, fused = {}, {}
    for base in reader.adapted():
        rule = plan.by_mm[base]
        if rule.op not in _ROW_OPS:
            raise ValueError(f"{base}: a LoRA adapter on a '{rule.op}' tensor has no PEFT form")
        a, b = reader.lora_pair(base)
        target = plan.spec.fused_parameter(rule.hf)
        if target is not None:
            fused.setdefault(target[0], {})[target[1]] = (a, b)
            continue
        modules.update({hf.removesuffix(".weight"): (a, part) for hf, part in zip(rule.hf, unfuse(rule, b))})
    return modules, fused


def stack_experts(plan: Plan, fused: dict[str, dict]) -> dict[str, tuple[Tensor, Tensor]]:
    """peft's LoRA on a 3D parameter ``[E, out, in]``: ``A`` ``[E r, in]`` (expert e's rows ``e r .. e r + r``),
    ``B`` ``[out, r E]`` (expert e's column j at ``j E + e``); an expert without an adapter gets zeros (no
    change). In the order of the model's tables, which is the order of a module's parameters."""
    experts: dict[str, int] = {}
    for rule in plan.by_mm.values():
        target = plan.spec.fused_parameter(rule.hf)
        if target is not None:
            experts[target[0]] = experts.get(target[0], 0) + 1
    out = {}
    for param, n in experts.items():
        if param not in fused:
            continue
        a0, b0 = next(iter(fused[param].values()))
        pairs = [fused[param].get(e, (a0.new_zeros(a0.shape), b0.new_zeros(b0.shape))) for e in range(n)]
        out[param] = (torch.cat([a for a, _ in pairs]), torch.stack([b for _, b in pairs], dim=-1).flatten(1))
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
    modules, fused = hf_adapters(plan, reader)
    adapters = {plan.names.from_canonical(m, "module"): (cast(a, cfg.dtype), cast(b, cfg.dtype))
                for m, (a, b) in modules.items()}
    ranks = sorted({a.shape[0] for a, _ in adapters.values()} | {a.shape[0] for e in fused.values()
                                                                  for a, _ in e.values()})
    if len(ranks) != 1:
        raise ValueError(f"{reader.tag_dir}: LoRA adapters of ranks {ranks}; a PEFT adapter here has one rank")
    r = ranks[0]
    parameters = {plan.names.from_canonical(p, "module"): (cast(a, cfg.dtype), cast(b, cfg.dtype))
                  for p, (a, b) in stack_experts(plan, fused).items()}
    args = reader.lora_args or {}
    dropout = float((args.get("lora_dropout") if isinstance(args, dict) else getattr(args, "lora_dropout", 0.0))
                    or 0.0)
    # peft scales by lora_alpha / r: alpha = scale * r gives the merge's scale whatever r the args say
    write_peft_adapter(dst, adapters, r, reader.lora_scale * r, dropout, str(Path(cfg.hf_config.hf_dir).resolve()),
                       parameters)
    return len(adapters) + len(parameters)
