"""The experts of a mixture-of-experts layer, without TransformerEngine or the ``grouped_gemm`` package.

megatron-core's grouped-GEMM experts need one of those two (``TEGroupedMLP``, ``GroupedMLP``); its
``SequentialMLP`` needs neither: one megatron ``MLP`` per local expert (``local_experts.i.linear_fc1`` =
``[gate; up]``, ``local_experts.i.linear_fc2``), run one after the other on that expert's tokens.
:class:`GroupedExperts` keeps those parameters (so checkpoints, expert parallelism and the gradient
reduction over the expert-data-parallel group are ``SequentialMLP``'s) and, on CUDA in bf16, computes
all local experts in two ``torch.nn.functional.grouped_mm`` calls instead of two GEMMs per expert
(:class:`GroupedLinear`: without a second copy of the expert weights kept for the backward).

The grouped GEMM takes each projection's weights as one ``[E, out, in]`` tensor. Stacking the experts'
separate parameters for every call copies all of them twice a step (forward and backward: a quarter of
the MoE decoder's GPU time at Qwen3-Omni-30B-A3B's widths, measured on an H200), so on its first grouped
call :func:`pack_expert_weights` moves each projection's expert weights into one storage, every
parameter a view ``[e]`` of it (same objects, same values: optimizers, hooks and checkpoints see no
change), and later calls take that storage as it is. Weights that already live inside a larger buffer
(megatron's distributed optimizer lays its parameters into one) are left there and stacked per call.
Everywhere else (CPU, fp32, fp16, biases, fp8) it is ``SequentialMLP``'s loop: torch's CPU grouped GEMM
has no reliable backward.

LoRA adapters on the experts (one per expert linear, ``mm_omni.lora``) join the grouped path as two more
grouped GEMMs per projection (``x A_e^T`` then ``B_e``) when every local expert's projection has one of the
same rank (a multiple of 8: the grouped GEMM's 16-byte strides in bf16); any other mix takes the loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP


def grouped_mm_available() -> bool:
    return hasattr(F, "grouped_mm")


class GroupedExperts(SequentialMLP):
    """``SequentialMLP`` whose forward is two grouped GEMMs over the local experts where torch has them."""

    def _grouped(self, hidden: torch.Tensor) -> bool:
        cfg = self.config
        expert = self.local_experts[0]
        return (grouped_mm_available() and hidden.is_cuda and hidden.dtype == torch.bfloat16
                and len(self.local_experts) > 1 and cfg.gated_linear_unit and not cfg.add_bias_linear
                and not (cfg.fp8 or cfg.fp4) and not cfg.moe_apply_probs_on_input
                and cfg.activation_func_clamp_value is None and cfg.glu_linear_offset == 0.0
                and expert.linear_fc1.bias is None and expert.linear_fc2.bias is None
                and all(_adapters(self.local_experts, fc) is not None for fc in ("linear_fc1", "linear_fc2")))

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        hidden = permuted_local_hidden_states
        if not self._grouped(hidden):
            return super().forward(hidden, tokens_per_expert, permuted_probs)
        # the tokens come sorted by local expert; offs[i] = end row of expert i
        offs = tokens_per_expert.to(device=hidden.device).cumsum(0).to(torch.int32)
        # megatron's dispatchers hand the counts over on the host: the experts without a token are known
        # there without a device sync (their weight gradients are zeroed one by one rather than by a mask);
        # common.token_dispatch keeps them on the device (a mask then)
        empty = None if tokens_per_expert.is_cuda else tuple((tokens_per_expert == 0).nonzero()[:, 0].tolist())
        fc1 = pack_expert_weights([e.linear_fc1.weight for e in self.local_experts])
        fc2 = pack_expert_weights([e.linear_fc2.weight for e in self.local_experts])
        inter = GroupedLinear.apply(hidden, offs, empty, *fc1)  # [gate; up]
        inter = inter + _grouped_lora(self.local_experts, "linear_fc1", hidden, offs, empty)
        gate, up = inter.chunk(2, dim=-1)
        # as megatron's MLP: act(gate) * up, scaled by each token's routing probability before fc2
        inter = (self.config.activation_func(gate) * up * permuted_probs.unsqueeze(-1)).to(hidden.dtype)
        out = GroupedLinear.apply(inter, offs, empty, *fc2)
        return out + _grouped_lora(self.local_experts, "linear_fc2", inter, offs, empty), None


def _owns_storage(t: torch.Tensor) -> bool:
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def packed_view(weights) -> torch.Tensor | None:
    """``torch.stack(weights)`` as a view without a copy when the weights lie back to back, in order, in
    one storage (contiguous, same shape and dtype); else None."""
    first = weights[0]
    n = first.numel()
    storage = first.untyped_storage().data_ptr()
    for e, w in enumerate(weights):
        if (w.shape != first.shape or w.dtype != first.dtype or not w.is_contiguous()
                or w.untyped_storage().data_ptr() != storage or w.storage_offset() != first.storage_offset() + e * n):
            return None
    if first.storage_offset() + len(weights) * n > first.untyped_storage().nbytes() // first.element_size():
        return None
    return first.detach().as_strided((len(weights), *first.shape), (n, *first.stride()))


@torch.no_grad()
def pack_expert_weights(weights: list) -> list:
    """``weights`` (parameters), each moved once into one shared ``[E, out, in]`` storage as its view ``[e]``
    when every one owns its storage (see the module docstring); returned as given."""
    if len(weights) > 1 and packed_view(weights) is None and all(_owns_storage(w) for w in weights):
        stacked = torch.stack([w.detach() for w in weights])
        for e, w in enumerate(weights):
            w.data = stacked[e]
    return weights


class GroupedLinear(torch.autograd.Function):
    """``x_e W_e^T`` for each expert e's rows of ``x`` (``offs``: their end rows), the weights given one per expert
    (``empty``: the experts without rows, when known on the host, else None).

    The weights are taken as one ``[E, out, in]`` tensor inside the forward and again inside the backward (a view
    of their packed storage, else a stack), and only the expert parameters themselves are kept for it: ``F.grouped_mm``'s own backward would keep the stacked
    copy from the forward to the backward, a second copy of every expert weight of every layer while the
    activations live (1.2 GB a layer at Qwen3-Omni-30B-A3B's widths, 58 GB over its 48 layers). Weight
    gradients are computed only for weights that need them (none for a frozen LoRA base); an expert that
    got no token gets a zero gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, offs: torch.Tensor, empty, *weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, offs, *weights)
        ctx.empty = empty
        return F.grouped_mm(x, _stacked(weights).transpose(-2, -1), offs=offs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, offs, *weights = ctx.saved_tensors
        grad_x = F.grouped_mm(grad, _stacked(weights), offs=offs) if ctx.needs_input_grad[0] else None
        grads = [None] * len(weights)
        if any(ctx.needs_input_grad[3:]):
            grad_w = F.grouped_mm(grad.t(), x, offs=offs)  # [E, out, in]: each expert's rows contracted
            if ctx.empty is None:  # counts on the device: a mask over every expert
                empty = torch.diff(offs, prepend=offs.new_zeros(1)) == 0
                grad_w.masked_fill_(empty[:, None, None], 0)
            else:
                for e in ctx.empty:
                    grad_w[e].zero_()
            grads = [grad_w[e] if ctx.needs_input_grad[3 + e] else None for e in range(len(weights))]
        return (grad_x, None, None, *grads)


def _stacked(weights) -> torch.Tensor:
    view = packed_view(weights)
    return torch.stack(weights) if view is None else view


def _adapters(experts, fc: str):
    """``[]`` when no local expert's ``fc`` has a LoRA adapter, the adapted linears when all have one of one
    rank (a multiple of 8) and scale, else None (the loop handles it)."""
    linears = [getattr(e, fc) for e in experts]
    ranks = {getattr(m, "lora_r", None) for m in linears}
    if ranks == {None}:
        return []
    if len(ranks) != 1 or None in ranks or next(iter(ranks)) % 8 or len({m.lora_scale for m in linears}) != 1:
        return None
    return linears


def _grouped_lora(experts, fc: str, x: torch.Tensor, offs: torch.Tensor, empty):
    """``scale * B_e A_e x`` for each expert's rows of ``x`` (0 without adapters)."""
    linears = _adapters(experts, fc)
    if not linears:
        return 0
    a = pack_expert_weights([m.lora_A.weight for m in linears])
    b = pack_expert_weights([m.lora_B.weight for m in linears])
    h = GroupedLinear.apply(linears[0]._lora_input(x, rank_local=False), offs, empty, *a)
    return GroupedLinear.apply(h, offs, empty, *b) * linears[0].lora_scale
