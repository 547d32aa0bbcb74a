"""Output layer + next-token cross entropy in token chunks, vocab-parallel (the default training loss).

``output_layer`` followed by megatron's ``vocab_parallel_cross_entropy`` materialises the logits of
the whole sequence and then an fp32 copy of them (``[s, vocab / tp]`` in fp32: 1.5 GiB for 2.5k
tokens of Qwen2.5's 152k vocabulary), kept for the backward. :func:`fused_lm_loss` computes the
logits ``chunk_tokens`` rows at a time; each chunk's softmax statistics are reduced over the
tensor-parallel ranks (max, sum of exponentials, target logit: the same three all-reduces as
megatron's kernel) and the chunk's gradient with respect to its logits, ``softmax - onehot``, is
written in the parameters' dtype into one ``[s, vocab / tp]`` buffer, the only full-size tensor.
The backward runs the two GEMMs that the output layer's backward would run, with the incoming
per-token gradients applied to their ``[s, h]`` operand / result rather than to the big buffer. fp32 exists for one chunk at a time. On CUDA with one
tensor-parallel rank the per-chunk arithmetic is a ``torch.compile``d kernel (two passes over the
bf16 logits instead of about ten over fp32 copies); elsewhere it is plain torch, the same math.

Same results as ``output_layer`` + :func:`vocab_parallel_lm_loss` (fp32: to rounding).
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

CHUNK_ELEMENTS = 1 << 28  # logits per chunk: 1 GiB in fp32


def _ce_chunk_single(logits: torch.Tensor, target: torch.Tensor):
    """One tensor-parallel rank: (loss [c] fp32, d loss / d logits [c, v] in the logits' dtype)."""
    lf = logits.float()
    row_max = lf.max(dim=-1, keepdim=True).values
    shifted = lf - row_max
    exp = shifted.exp()
    sum_exp = exp.sum(dim=-1, keepdim=True)
    picked = shifted.gather(-1, target[:, None])
    loss = (sum_exp.log() - picked)[:, 0]
    onehot = torch.arange(logits.shape[-1], device=logits.device)[None, :] == target[:, None]
    grad = (exp / sum_exp - onehot.to(exp.dtype)).to(logits.dtype)
    return loss, grad


@functools.lru_cache(maxsize=None)
def _compiled_ce_chunk():
    return torch.compile(_ce_chunk_single, dynamic=True)


def _ce_chunk_parallel(logits, target, vocab_start, group):
    """Any number of tensor-parallel ranks (eager): megatron's three all-reduces, per chunk."""
    lf = logits.float()
    row_max = lf.max(dim=-1).values
    if group is not None:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    lf -= row_max[:, None]
    local = target - vocab_start
    outside = (local < 0) | (local >= lf.shape[-1])
    local = local.masked_fill(outside, 0)
    picked = lf.gather(-1, local[:, None])[:, 0].masked_fill(outside, 0.0)
    lf.exp_()
    sum_exp = lf.sum(dim=-1)
    if group is not None:
        dist.all_reduce(picked, group=group)
        dist.all_reduce(sum_exp, group=group)
    loss = sum_exp.log() - picked
    lf.div_(sum_exp[:, None])
    rows = torch.arange(lf.shape[0], device=lf.device)
    lf[rows, local] -= (~outside).to(lf.dtype)
    return loss, lf.to(logits.dtype)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, group, chunk_tokens, compiled):
        n, v = hidden.shape[0], weight.shape[0]
        tp = dist.get_world_size(group) if group is not None else 1
        vocab_start = (dist.get_rank(group) if group is not None else 0) * v
        grad_logits = torch.empty(n, v, dtype=hidden.dtype, device=hidden.device)
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_tokens):
            end = min(start + chunk_tokens, n)
            logits = hidden[start:end] @ weight.t()
            if compiled and tp == 1:
                try:
                    loss[start:end], grad_logits[start:end] = _compiled_ce_chunk()(logits, target[start:end])
                    continue
                except Exception as err:  # noqa: BLE001 - no working compiler: the eager math below
                    logger.warning("compiled cross entropy unavailable (%s: %s); using eager",
                                   type(err).__name__, str(err).splitlines()[0][:200])
                    compiled = False
            loss[start:end], grad_logits[start:end] = _ce_chunk_parallel(
                logits, target[start:end], vocab_start, group if tp > 1 else None)
        ctx.save_for_backward(hidden, weight, grad_logits)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        hidden, weight, grad_logits = ctx.saved_tensors
        # d loss_t / d logits_t = g_t * grad_logits_t: the per-token scale g goes on the [n, h] side of
        # each GEMM (rows of hidden, rows of the result), never over the [n, vocab] buffer
        scale = grad_loss[:, None].to(hidden.dtype)
        grad_hidden = (grad_logits @ weight) * scale if ctx.needs_input_grad[0] else None
        grad_weight = grad_logits.t() @ (hidden * scale) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None, None


def fused_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  group: Optional[dist.ProcessGroup] = None, chunk_tokens: Optional[int] = None) -> torch.Tensor:
    """Per-token loss ``[b, s]`` (fp32) of ``hidden`` ``[s, b, h]`` against ``targets`` ``[b, s]``.

    ``weight`` is this rank's ``[vocab / tp, h]`` shard; ``hidden`` is already what the output layer
    would multiply (gathered from the sequence-parallel region, identical on every TP rank, its
    backward all-reduced by the caller's megatron mapping). ``targets`` must be valid ids (the caller
    masks ignored positions, as for :func:`vocab_parallel_lm_loss`).
    """
    s, b, h = hidden.shape
    # rows in megatron's [s, b] order: a view, so the gradient comes back contiguous (megatron's TP
    # mappings all-reduce it in place, which a transposed gradient would silently break)
    flat = hidden.reshape(s * b, h)
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_ELEMENTS // weight.shape[0])
    if group is not None and dist.get_world_size(group) == 1:
        group = None
    compiled = hidden.is_cuda
    loss = _FusedLinearCrossEntropy.apply(flat, weight, targets.t().reshape(-1), group, chunk_tokens, compiled)
    return loss.view(s, b).t()


def output_layer_lm_loss(output_layer, hidden: torch.Tensor, weight: Optional[torch.Tensor], targets: torch.Tensor,
                         ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``output_layer(hidden)`` + :func:`vocab_parallel_lm_loss` return, without the full logits
    and without the rows that have no target (their loss is 0, their gradient nothing).

    ``output_layer`` is megatron's ``ColumnParallelLinear`` (no bias, ``gather_output=False``);
    ``weight`` the tied embedding when it is shared. Its input mapping is the layer's own: an
    all-gather of the sequence-parallel shards (reduce-scatter in the backward), or an identity
    whose backward all-reduces over the tensor-parallel group.
    """
    from megatron.core import tensor_parallel

    group = output_layer.tp_group
    weight = output_layer.weight if weight is None else weight
    if output_layer.sequence_parallel:
        hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, True, group=group)
    elif output_layer.allreduce_dgrad:
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group=group)
    mask = targets != ignore_index
    s, b, h = hidden.shape
    flat_targets = targets.t().reshape(-1)  # megatron's [s, b] row order
    # only rows with a target go through the output layer: in SFT the prompt and the media tokens
    # have none, and the [rows, vocab] GEMMs are the biggest in the model. The row count sizes the
    # GEMMs, so reading it costs one host sync; every TP rank holds the same targets, so the same rows.
    rows = (flat_targets != ignore_index).nonzero()[:, 0]
    if rows.numel() == s * b:
        loss = fused_lm_loss(hidden, weight, targets, group)
    else:
        picked = fused_lm_loss(hidden.reshape(s * b, h).index_select(0, rows)[:, None], weight,
                               flat_targets.index_select(0, rows)[None], group)[0]
        loss = picked.new_zeros(s * b).index_copy(0, rows, picked).view(s, b).t()
    return loss, mask.to(loss.dtype)
