"""Fusing HF's separate projections into Megatron's fused linears, and back.

Megatron's ``linear_qkv`` stores rows per query group: ``[q_g0, k_g0, v_g0, q_g1, k_g1, v_g1, ...]``,
so a tensor-parallel rank that takes a contiguous row block gets whole groups. ``linear_fc1`` of a
gated MLP is ``cat([gate, up], 0)``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def interleave_groups(parts: Sequence[Tensor], groups: int) -> Tensor:
    """``[a, b, c]`` (each with ``groups * n_i`` rows) -> rows ``[a_g0, b_g0, c_g0, a_g1, ...]``."""
    tail = parts[0].shape[1:]
    for p in parts:
        if p.shape[0] % groups or p.shape[1:] != tail:
            raise ValueError(f"cannot interleave shapes {[tuple(t.shape) for t in parts]} into {groups} groups")
    return torch.cat([p.reshape(groups, -1, *tail) for p in parts], 1).reshape(-1, *tail)


def split_groups(fused: Tensor, groups: int, rows_per_group: Sequence[int]) -> list[Tensor]:
    """Inverse of :func:`interleave_groups`; ``rows_per_group`` = rows of each part in one group."""
    tail = fused.shape[1:]
    if fused.shape[0] != groups * sum(rows_per_group):
        raise ValueError(
            f"fused tensor has {fused.shape[0]} rows, expected {groups} groups x {list(rows_per_group)}")
    chunks = fused.reshape(groups, sum(rows_per_group), *tail).split(list(rows_per_group), 1)
    # reshape of a strided split copies: each part comes out contiguous (safetensors needs that)
    return [c.reshape(-1, *tail).contiguous() for c in chunks]


def cat_gate_up(gate: Tensor, up: Tensor) -> Tensor:
    return torch.cat([gate, up], 0)


def split_gate_up(fused: Tensor) -> tuple[Tensor, Tensor]:
    if fused.shape[0] % 2:
        raise ValueError(f"gated linear_fc1 needs an even row count, got {tuple(fused.shape)}")
    gate, up = fused.chunk(2, 0)
    return gate.contiguous(), up.contiguous()
