"""LoRA adapters on megatron-core's ``ColumnParallelLinear`` and ``RowParallelLinear`` (and plain ``nn.Linear``).

``y = base(x) + scale * B(A(dropout(x)))``, ``scale = alpha / r``; ``A`` Kaiming-uniform, ``B`` zero,
so an adapted model computes exactly what the base model computes until ``B`` moves.

The adapter extends the linear in place (its class becomes a subclass of its own class), so every
existing name stays: ``...linear_qkv.weight`` still loads from a base checkpoint and the adapter adds
``...linear_qkv.lora_A.weight`` / ``...linear_qkv.lora_B.weight``; megatron's modules keep calling
the same object, ``isinstance`` checks keep holding.

Tensor parallelism (``W`` is ``[out, in]``; ``x`` the layer input; ``h = A x`` has ``r`` features):

- column-parallel (``W`` split on ``out``): ``A`` ``[r, in]`` replicated, ``B`` ``[out/tp, r]`` split
  like ``W``. ``x`` is the same on every TP rank, so is ``h``; ``h`` passes through
  ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce backward): each rank's
  ``dL/dh`` only covers its ``out/tp`` outputs, the all-reduce sums them, so ``A`` gets the full
  gradient (the same on every rank) and so does ``x``. With sequence parallel ``x`` is a sequence
  shard: ``h`` is all-gathered along the sequence (backward: reduce-scatter), and ``A``'s gradient,
  which then covers only this rank's tokens, is summed over TP by megatron's ``finalize_model_grads``
  (``sequence_parallel`` attribute, as for norms).
- row-parallel (``W`` split on ``in``): ``A`` ``[r, in/tp]`` split like ``W``, ``B`` ``[out, r]``
  replicated. Each rank's ``A_r x_r`` is a partial sum of ``h``: all-reduced
  (``reduce_from_tensor_model_parallel_region``: identity backward, the output gradient is already
  whole), then ``B h`` is the same on every rank. With sequence parallel the partial ``h`` is
  reduce-scattered to this rank's tokens, and ``B``'s gradient is summed over TP as above.

So a TP=2 run computes what a TP=1 run computes (up to summation order), with an ``r``-wide
collective per adapted layer. Dropout acts on the LoRA input only; where that input differs per TP
rank (row-parallel, or sequence parallel) its mask comes from megatron's model-parallel RNG stream,
else from the default stream that every TP rank shares (same input, same mask).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)

from mm_omni.lora.targets import LoraTargetError


class LoraMixin:
    """State and shared pieces of both adapters (mixed into a subclass of the base linear)."""

    lora_r: int
    lora_scale: float

    def _add_lora(self, r: int, alpha: float, dropout: float, full_a: torch.Tensor, a_split_dim: Optional[int],
                  b_rows: int) -> None:
        tp_size = torch.distributed.get_world_size(self.tp_group) if self.tp_group is not None else 1
        tp_rank = torch.distributed.get_rank(self.tp_group) if self.tp_group is not None else 0
        weight = self.weight
        a = full_a if a_split_dim is None else full_a.chunk(tp_size, a_split_dim)[tp_rank]
        self.lora_A = torch.nn.Linear(a.shape[1], r, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_B = torch.nn.Linear(r, b_rows, bias=False, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.zero_()
        self.lora_dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        self.lora_r, self.lora_alpha, self.lora_scale = r, alpha, alpha / r
        for p in (self.lora_A.weight, self.lora_B.weight):
            p.is_lora = True
            # an expert's weight (expert parallel) is reduced over the expert-data-parallel group, not the
            # whole data-parallel one: megatron's DDP reads this flag, and the adapter's gradient is the expert's
            p.allreduce = getattr(weight, "allreduce", True)

    def _lora_input(self, x: torch.Tensor, rank_local: bool) -> torch.Tensor:
        if isinstance(self.lora_dropout, torch.nn.Identity) or not self.training:
            return x
        if rank_local:  # the input differs per TP rank: independent masks
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self.lora_dropout(x)
        return self.lora_dropout(x)

    def lora_delta_weight(self) -> torch.Tensor:
        """``scale * B @ A`` of this rank's shard (the same shape as ``weight``)."""
        return self.lora_scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())


class LoraColumnParallelLinear(LoraMixin, ColumnParallelLinear):
    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None):
        output, output_bias = super().forward(input_, weight, runtime_gather_output)
        x = self._lora_input(input_, rank_local=self.sequence_parallel)
        h = self.lora_A(x)
        if self.sequence_parallel:
            h = gather_from_sequence_parallel_region(h, tensor_parallel_output_grad=True, group=self.tp_group)
        else:
            h = copy_to_tensor_model_parallel_region(h, group=self.tp_group)
        delta = self.lora_B(h) * self.lora_scale
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather:
            delta = gather_from_tensor_model_parallel_region(delta, group=self.tp_group)
        return output + delta.to(output.dtype), output_bias


class LoraRowParallelLinear(LoraMixin, RowParallelLinear):
    def forward(self, input_: torch.Tensor):
        output, output_bias = super().forward(input_)
        x = self._lora_input(input_, rank_local=True)
        h = self.lora_A(x)
        if self.sequence_parallel:
            h = reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)
        else:
            h = reduce_from_tensor_model_parallel_region(h, group=self.tp_group)
        delta = self.lora_B(h) * self.lora_scale
        return output + delta.to(output.dtype), output_bias


class LoraLinear(LoraMixin, torch.nn.Linear):
    """A plain (replicated) ``torch.nn.Linear``, e.g. the audio encoder's output projection."""

    tp_group = None

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        return super().forward(input_) + self.lora_B(self.lora_A(self._lora_input(input_, False))) * self.lora_scale


def kaiming_a(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """The full (unsplit) ``A``: Kaiming-uniform with ``a=sqrt(5)``, as ``nn.Linear`` and peft do."""
    a = torch.empty(rows, cols)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a


def add_lora(linear: torch.nn.Module, r: int, alpha: float, dropout: float, generator: torch.Generator) -> None:
    """Turn ``linear`` (a megatron Column/RowParallelLinear) into its LoRA version, in place.

    ``generator`` draws the full ``A`` (then this rank takes its shard), so every TP / PP / DP layout
    starts from the same adapter when it is seeded by the layer's global name.
    """
    if r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {r}")
    if isinstance(linear, LoraMixin):
        raise ValueError(f"{type(linear).__name__} already has a LoRA adapter")
    if getattr(linear, "weight", None) is None:
        raise ValueError(f"{type(linear).__name__} has no weight of its own (skip_weight_param_allocation)")
    if getattr(linear, "is_expert", False) and linear.tp_group is not None and linear.tp_group.size() > 1:
        # the token dispatcher does an expert linear's tensor-parallel communication (explicit_expert_comm):
        # an adapter's collectives would double it
        raise LoraTargetError("LoRA on the experts needs --expert-tensor-parallel-size 1 (experts tensor-parallel "
                              f"over {linear.tp_group.size()} ranks here): split the experts with "
                              "--expert-model-parallel-size instead, or leave them out of --lora-target-modules")
    if isinstance(linear, ColumnParallelLinear):
        linear.__class__ = _subclass(type(linear), LoraColumnParallelLinear)
        full_a = kaiming_a(r, linear.input_size, generator)
        linear._add_lora(r, alpha, dropout, full_a, None, linear.output_size_per_partition)
        tensor_parallel.set_tensor_model_parallel_attributes(linear.lora_B.weight, True, 0, 1)
        sp_param = linear.lora_A.weight
    elif isinstance(linear, RowParallelLinear):
        if not linear.input_is_parallel:
            raise NotImplementedError("LoRA on a RowParallelLinear with input_is_parallel=False (megatron's "
                                      "layers always take a parallel input)")
        linear.__class__ = _subclass(type(linear), LoraRowParallelLinear)
        full_a = kaiming_a(r, linear.input_size, generator)
        linear._add_lora(r, alpha, dropout, full_a, 1, linear.output_size)
        tensor_parallel.set_tensor_model_parallel_attributes(linear.lora_A.weight, True, 1, 1)
        sp_param = linear.lora_B.weight
    elif isinstance(linear, torch.nn.Linear):
        linear.__class__ = _subclass(type(linear), LoraLinear)
        linear._add_lora(r, alpha, dropout, kaiming_a(r, linear.in_features, generator), None, linear.out_features)
        return
    else:
        raise TypeError(f"LoRA adapts megatron-core's ColumnParallelLinear / RowParallelLinear (or a plain "
                        f"torch.nn.Linear), not {type(linear).__name__}")
    if linear.sequence_parallel:
        sp_param.sequence_parallel = True  # its gradient covers this rank's tokens: summed over TP


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _subclass(base: type, lora: type) -> type:
    """``lora`` itself for the plain megatron class; a LoRA subclass of any subclass of it."""
    if base in (ColumnParallelLinear, RowParallelLinear, torch.nn.Linear):
        return lora
    key = (base, lora)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"Lora{base.__name__}", (lora, base), {})
    return _SUBCLASSES[key]
