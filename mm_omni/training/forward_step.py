"""The forward step megatron-core's schedules call, and the loss reduction of the three loss modes.

megatron-core divides what ``loss_func`` returns by its second element unless
``calculate_per_token_loss`` is set, then by the number of micro-batches; DDP averages over DP.
So the three modes are:

- ``micro_batch_mean`` (default, MindSpeed-MM's and Megatron's): (sum of token losses / tokens)
  per micro-batch, averaged over micro-batches and DP ranks;
- ``per_token`` (``--calculate-per-token-loss``): sum of token losses over the global batch / all
  its label tokens (megatron scales the gradients by the global token count in
  ``finalize_model_grads``);
- ``per_sample`` (``--calculate-per-sample-loss``): mean over the tokens of each sample, then the
  mean over samples of the micro-batch, averaged like the default.

Packed micro-batches (``cu_seqlens``; with token-budget packing a micro-batch is ``micro_batch_size``
packs of rows): ``micro_batch_mean`` is the mean over the label tokens of the micro-batch, i.e. of
all its packs together, and ``per_token`` is unchanged (a sum over tokens does not see packing). A
*sample* of ``per_sample`` is a row, not a pack: the model's output says which packed sequence each
token belongs to (``segment_ids``, ``num_segments``), each row's mean is taken over its own tokens and
the micro-batch's loss is the mean of its rows' means, as if the rows came unpacked; a sequence
without label tokens (the collator's bucket padding) counts for nothing.

The reported ``lm loss`` is the quantity that is optimised, in each mode.

Context parallelism: each CP rank holds part of every sequence (its ``per_token_loss`` covers its
tokens only) and DDP averages gradients over DP x CP. The token counts that divide a loss (of the
micro-batch, of each sample or packed row: one count per sequence of ``cu_seqlens``, the same number on
every CP rank) are summed over the CP group, and the two averaged modes multiply the
back-propagated value by the CP size, so the sum over CP ranks is the full sequence's loss (what
megatron's ``pretrain_gpt`` does for its loss). ``per_token`` needs neither: megatron already sums
its token counts over DP x CP.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state

from mm_omni.training.task import TrainTask

MODES = ("micro_batch_mean", "per_token", "per_sample")


def loss_mode(args) -> str:
    if args.calculate_per_token_loss:
        return "per_token"
    if args.calculate_per_sample_loss:
        return "per_sample"
    return "micro_batch_mean"


def describe_loss_mode(mode: str) -> str:
    return {
        "micro_batch_mean": "loss = mean over label tokens of each micro-batch, averaged over micro-batches "
                            "and data-parallel ranks (Megatron/MindSpeed-MM default)",
        "per_token": "loss = sum of token losses over the global batch / its number of label tokens "
                     "(--calculate-per-token-loss)",
        "per_sample": "loss = mean over tokens per sample, mean over samples, averaged over micro-batches "
                      "and data-parallel ranks (--calculate-per-sample-loss)",
    }[mode]


def loss_func(mode: str, output) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(value to back-propagate before megatron's division, divisor, {"lm loss": [sum, count]})."""
    per_token, mask = output.per_token_loss.float(), output.loss_mask.float()
    cp = parallel_state.get_context_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
    if mode == "per_sample":
        sums, tokens = _per_sample(per_token, mask, output)
        tokens = _sum_over_cp(tokens, cp)
        has = tokens > 0
        loss = torch.where(has, sums / tokens.clamp(min=1), 0.0).sum()
        count = has.sum()
    else:
        loss, count = per_token.sum(), mask.sum()
        if mode == "micro_batch_mean":
            count = _sum_over_cp(count, cp)
    if cp > 1 and mode != "per_token":
        loss = loss * cp
    count = count.to(torch.int)
    if mode == "per_token":
        report = torch.stack([loss.detach(), count.float()])
    else:  # each micro-batch weighs the same: report its mean with weight 1
        report = torch.stack([loss.detach() / count.clamp(min=1), torch.ones_like(loss)])
    return loss, count, {"lm loss": report}


def _per_sample(per_token: torch.Tensor, mask: torch.Tensor, output) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, label tokens) of every sample on this rank: a row of ``[b, s]``, or a packed sequence."""
    seg = getattr(output, "segment_ids", None)
    if seg is None:
        return per_token.sum(-1), mask.sum(-1)
    seg, n = seg.reshape(-1).to(per_token.device, torch.long), output.num_segments
    sums = per_token.new_zeros(n).index_add(0, seg, per_token.reshape(-1))
    tokens = mask.new_zeros(n).index_add(0, seg, mask.reshape(-1))
    return sums, tokens


def _sum_over_cp(t: torch.Tensor, cp: int) -> torch.Tensor:
    """``t`` summed over the context-parallel group (a count: no gradient)."""
    if cp == 1:
        return t
    t = t.detach().clone()
    torch.distributed.all_reduce(t, group=parallel_state.get_context_parallel_group())
    return t


class ForwardStep:
    """``forward_step_func(data_iterator, model)`` for megatron-core's schedules; counts tokens seen."""

    def __init__(self, task: TrainTask, mode: str):
        self.task, self.mode = task, mode
        self.tokens = 0
        self.flops = 0.0

    def __call__(self, data_iterator, model):
        batch = next(data_iterator)
        self.tokens += self.task.count_tokens(batch)
        if self.task.count_flops is not None:
            self.flops += self.task.count_flops(batch)
        out = self.task.forward(model, batch)
        if not isinstance(out, torch.Tensor) and getattr(out, "per_token_loss", None) is None:
            out = out.hidden_states  # a non-last pipeline stage
        return out, partial(loss_func, self.mode)
