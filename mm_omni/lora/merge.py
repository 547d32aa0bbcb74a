"""Merge LoRA into base weights: ``W + scale * B @ A`` (pure torch, no megatron: the converter uses it).

Merging a tensor-parallel shard is exact on its own, whatever the fused layout: a column-parallel
shard is ``W_r`` (rows r) with ``B_r`` (the same rows) and the replicated ``A``; a row-parallel shard
is ``W_r`` (columns r) with the replicated ``B`` and ``A_r`` (the same columns). Equally, the global
``A`` and ``B``, each put together by its own split (:func:`lora_split_kinds`), give the global delta:
``B``'s rows (or ``A``'s columns) are merged exactly as ``W``'s, so fused QKV (rows interleaved per
query group) or gate/up (``[gate_r; up_r]`` per rank) need no special case: the delta's rows follow
``W``'s, and an adapter saved at one TP size merges into a base saved at another.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import torch
from torch import Tensor

_LORA = re.compile(r"(^|\.)lora_([AB])\.weight$")


def is_lora_key(name: str) -> bool:
    return _LORA.search(name) is not None


def base_key(lora_key: str) -> str:
    """``x.linear_qkv.lora_A.weight`` -> ``x.linear_qkv.weight``."""
    m = _LORA.search(lora_key)
    return lora_key[: m.start()] + m.group(1) + "weight"


def lora_keys(base: str) -> tuple[str, str]:
    """``x.weight`` -> (``x.lora_A.weight``, ``x.lora_B.weight``)."""
    stem = base[: -len("weight")]
    return stem + "lora_A.weight", stem + "lora_B.weight"


def lora_split_kinds(weight_kind: str) -> tuple[str, str]:
    """How ``A`` and ``B`` split over TP, given the base weight's split kind (see ``mm_omni.checkpoint.tp``):
    a row-parallel linear (``col``: ``W`` split on its input) splits ``A`` the same way and replicates
    ``B``; a column-parallel one (``row`` / ``glu``) replicates ``A`` and splits ``B``'s rows like ``W``'s."""
    return ("col", "rep") if weight_kind == "col" else ("rep", weight_kind)


def merged_weight(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """``weight + scale * lora_b @ lora_a`` computed in fp32, returned in ``weight``'s dtype."""
    if lora_b.shape[0] != weight.shape[0] or lora_a.shape[1] != weight.shape[1] or lora_a.shape[0] != lora_b.shape[1]:
        raise ValueError(f"LoRA shapes A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} do not fit the weight "
                         f"{tuple(weight.shape)}")
    return (weight.float() + scale * (lora_b.float() @ lora_a.float())).to(weight.dtype)


def merge_state_dict(state: Mapping[str, Tensor], scale: float) -> dict[str, Tensor]:
    """A state dict (one rank's shard or a full one) with every adapter merged and its keys dropped."""
    out = {k: v for k, v in state.items() if not is_lora_key(k)}
    for key in state:
        if is_lora_key(key):
            base = base_key(key)
            a, b = lora_keys(base)
            if base not in state or a not in state or b not in state:
                raise KeyError(f"{key}: its base weight, lora_A or lora_B is missing from the state dict")
            if key == a:
                out[base] = merged_weight(state[base], state[a], state[b], scale)
    return out


def scale_from_args(args, alpha: Optional[float] = None, r: Optional[int] = None) -> Optional[float]:
    """``alpha / r`` from a checkpoint's saved ``args`` (a dict or an argparse Namespace); overrides win."""
    def get(name):
        return args.get(name) if isinstance(args, Mapping) else getattr(args, name, None)

    alpha = alpha if alpha is not None else (get("lora_alpha") if args is not None else None)
    r = r if r is not None else (get("lora_r") if args is not None else None)
    if alpha is None or not r:
        return None
    return float(alpha) / float(r)


@torch.no_grad()
def merge_lora_(module: torch.nn.Module) -> int:
    """Fold every adapter of a live model into its base weight (``B`` is zeroed after): returns the count.

    The layers keep their adapters (now contributing nothing), so the model computes the same as
    before; use it to evaluate or save merged weights from a training process.
    """
    n = 0
    for m in module.modules():
        if hasattr(m, "lora_delta_weight"):
            m.weight.copy_((m.weight.float() + m.lora_delta_weight()).to(m.weight.dtype))
            m.lora_B.weight.zero_()
            n += 1
    return n
