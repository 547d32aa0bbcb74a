"""Tensor-parallel split / merge of one tensor, by Megatron's parallel-linear kind.

* ``row``: split along dim 0 (column-parallel linears' output rows, vocab-parallel embeddings,
  interleaved QKV: each rank gets whole query groups);
* ``glu``: a fused ``[gate; up]`` where rank r must get ``[gate_r; up_r]``, not a plain row block;
* ``col``: split along dim 1 (row-parallel linears' input columns);
* ``rep``: replicated (norms, convs, row-parallel biases).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor

SplitKind = Literal["row", "col", "glu", "rep"]


def split(t: Tensor, kind: SplitKind, tp: int) -> list[Tensor]:
    """``tp`` views of ``t`` (clone before ``torch.save``: saving a view writes its whole storage)."""
    if tp == 1 or kind == "rep":
        return [t] * tp
    if kind == "row":
        return list(t.chunk(tp, 0)) if t.shape[0] % tp == 0 else _bad(t, kind, tp)
    if kind == "col":
        return list(t.chunk(tp, 1)) if t.shape[1] % tp == 0 else _bad(t, kind, tp)
    if t.shape[0] % (2 * tp):
        _bad(t, kind, tp)
    gate, up = t.chunk(2, 0)
    return [torch.cat([g, u], 0) for g, u in zip(gate.chunk(tp, 0), up.chunk(tp, 0))]


def merge(shards: Sequence[Tensor], kind: SplitKind) -> Tensor:
    """Inverse of :func:`split` over the shards of one module's TP group (ranks 0..tp-1)."""
    if len(shards) == 1 or kind == "rep":
        return shards[0]
    if kind == "row":
        return torch.cat(list(shards), 0)
    if kind == "col":
        return torch.cat(list(shards), 1)
    pairs = [s.chunk(2, 0) for s in shards]
    return torch.cat([p[0] for p in pairs] + [p[1] for p in pairs], 0)


def split_dim(kind: SplitKind) -> int | None:
    """The dim whose size is divided by TP (``glu`` splits dim 0 in two halves); None if replicated."""
    return {"row": 0, "glu": 0, "col": 1}.get(kind)


def _bad(t: Tensor, kind: str, tp: int):
    raise ValueError(f"cannot {kind}-split a tensor of shape {tuple(t.shape)} into {tp} tensor-parallel ranks")


def shard(t: Tensor, kind: SplitKind, tp: int, rank: int) -> Tensor:
    """Rank ``rank``'s piece only (``glu`` concatenates just this rank's gate/up rows)."""
    if tp == 1 or kind != "glu":
        return split(t, kind, tp)[rank]
    if t.shape[0] % (2 * tp):
        _bad(t, kind, tp)
    gate, up = t.chunk(2, 0)
    return torch.cat([gate.chunk(tp, 0)[rank], up.chunk(tp, 0)[rank]], 0)
