"""The training loop on megatron-core: schedules, DDP, optimizer step, lr schedule, logging, checkpoints."""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from mm_omni import platform
from mm_omni.training import checkpointing
from mm_omni.training.forward_step import ForwardStep, describe_loss_mode, loss_mode
from mm_omni.training.metrics import TensorBoard, iteration_line, resolve_peak_tflops, summary_line
from mm_omni.training.model_setup import build_model, unwrap
from mm_omni.training.moe_metrics import NAME as LOAD_BALANCING, has_experts, start_tracker, step_load_balancing_loss
from mm_omni.training.optimizer import build_optimizer, build_scheduler
from mm_omni.training.profiling import StepProfiler
from mm_omni.training.task import TrainTask

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    iteration: int = 0
    consumed_samples: int = 0
    losses: dict = field(default_factory=dict)  # iteration -> lm loss (on the last pipeline stage)
    grad_norms: dict = field(default_factory=dict)
    load_balancing_losses: dict = field(default_factory=dict)  # iteration -> MoE load-balancing loss (MoE models)
    iteration_ms: dict = field(default_factory=dict)  # iteration -> wall ms (benchmarks)
    iteration_tokens: dict = field(default_factory=dict)  # iteration -> tokens over all DP ranks


def _is_logging_rank() -> bool:
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def train(args: argparse.Namespace, task: TrainTask) -> TrainResult:
    """Train ``task`` as ``args`` say; returns the reported losses (used by the tests)."""
    mode = loss_mode(args)
    if torch.distributed.get_rank() == 0:
        logger.info("%s", describe_loss_mode(mode))
        logger.info("parallel: TP %d%s, PP %d%s, CP %d, EP %d, DP %d; global batch %d = micro-batch %d x %d micro-batches "
                    "x DP",
                    args.tensor_model_parallel_size, " (+ sequence parallel)" if args.sequence_parallel else "",
                    args.pipeline_model_parallel_size, f" (VPP {args.vpp_size})" if args.vpp_size else "",
                    args.context_parallel_size, args.expert_model_parallel_size, args.data_parallel_size,
                    args.global_batch_size, args.micro_batch_size, args.num_microbatches)
    chunks = build_model(args, task)
    optimizer = build_optimizer(args, chunks)
    scheduler = build_scheduler(args, optimizer)
    result = TrainResult()
    if args.load:
        result.iteration, result.consumed_samples = checkpointing.load_checkpoint(
            args.load, chunks, optimizer, scheduler, args, after_model_load=task.after_load)
    _set_schedule_hooks(args, chunks, optimizer, task.before_grad_sync, task.after_grad_sync)
    if task.valid_data_iterator is None and "--eval-interval" in args.given and torch.distributed.get_rank() == 0:
        logger.info("--eval-interval/--eval-iters accepted: %s has no validation data, no evaluation runs", task.name)
    tb = TensorBoard(args.tensorboard_dir, enabled=_is_logging_rank())
    step = ForwardStep(task, mode)
    model_config = unwrap(chunks[0]).config
    if has_experts(model_config):
        start_tracker(model_config)
    iters = _data_iterators(task, chunks, result.consumed_samples)
    forward_backward = get_forward_backward_func()
    seq_length = task.seq_length or args.seq_length or 1
    peak = resolve_peak_tflops(args) if _is_logging_rank() else None
    start, tokens_at_start, last_log = time.time(), 0, (time.time(), result.iteration, 0, 0.0)
    total_tokens, total_flops = 0, 0.0
    profiler = StepProfiler(args)
    while result.iteration < args.train_iters:
        profiler.before_iteration(result.iteration + 1)
        iteration_start = time.time()
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        step.tokens, step.flops = 0, 0.0
        step_iters = _step_iterators(task, chunks, iters, args.num_microbatches, forward_only=False)
        losses = forward_backward(
            forward_step_func=step, data_iterator=step_iters if len(step_iters) > 1 else step_iters[0],
            model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=args.num_microbatches,
            seq_length=seq_length, micro_batch_size=args.micro_batch_size, forward_only=False)
        ok, grad_norm, _ = optimizer.step()
        if ok:
            scheduler.step(increment=1)
        result.iteration += 1
        result.consumed_samples += args.global_batch_size
        profiler.after_iteration(result.iteration)
        reduced = _reduce_losses(losses)
        balance = step_load_balancing_loss(model_config, args.num_microbatches)  # a collective on every rank
        tokens, flops = _global_counts(step.tokens, step.flops)  # a collective read: the step has finished
        total_tokens += tokens
        total_flops += flops
        result.iteration_ms[result.iteration] = (time.time() - iteration_start) * 1e3
        result.iteration_tokens[result.iteration] = tokens
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            result.losses[result.iteration] = reduced.get("lm loss")
            result.grad_norms[result.iteration] = grad_norm
            if balance is not None:
                reduced[LOAD_BALANCING] = balance  # logged next to the lm loss
                result.load_balancing_losses[result.iteration] = balance
        if result.iteration % args.log_interval == 0:
            last_log = _log(args, result, reduced, grad_norm, optimizer, last_log, total_tokens, total_flops,
                            peak, tb)
        _maybe_evaluate(args, task, chunks, result, forward_backward, mode, seq_length)
        if args.save and args.save_interval and result.iteration % args.save_interval == 0:
            _save(args, result, chunks, optimizer, scheduler)
        if args.exit_interval and result.iteration % args.exit_interval == 0:
            logger.info("exiting at iteration %d (--exit-interval %d)", result.iteration, args.exit_interval)
            break
    else:
        if args.save and not (args.save_interval and result.iteration % args.save_interval == 0):
            _save(args, result, chunks, optimizer, scheduler)
    tb.close()
    platform.synchronize()
    if _is_logging_rank():
        logger.info("%s", summary_line(result.iteration, time.time() - start, total_tokens - tokens_at_start,
                                       torch.distributed.get_world_size(), total_flops, peak))
    return result


def _data_iterators(task: TrainTask, chunks, consumed: int) -> list:
    """One iterator per model chunk; one in all when the task reads each step's micro-batches first."""
    return [task.data_iterator(consumed) for _ in (chunks if task.before_schedule is None else chunks[:1])]


def _step_iterators(task: TrainTask, chunks, iters: list, num_microbatches: int, forward_only: bool) -> list:
    """The iterators one schedule reads; with ``task.before_schedule`` the step's micro-batches are
    read here, handed to it, then replayed to every chunk."""
    if task.before_schedule is None:
        return iters
    batches = [next(iters[0]) for _ in range(num_microbatches)]
    task.before_schedule(chunks, batches, forward_only)
    return [iter(batches) for _ in chunks]


def _set_schedule_hooks(args, chunks, optimizer, before_grad_sync=None, after_grad_sync=None) -> None:
    """What megatron's schedules call: loss scaling, grad sync hooks, the final grad reduction."""
    config = unwrap(chunks[0]).config
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    if before_grad_sync is not None or after_grad_sync is not None:
        def finalize_with_hooks(model, *a, **kw):
            if before_grad_sync is not None:
                before_grad_sync(model)
            finalize_model_grads(model, *a, **kw)
            if after_grad_sync is not None:
                after_grad_sync(model)

        config.finalize_model_grads_func = finalize_with_hooks
    config.timers = None
    if args.overlap_grad_reduce:
        syncs = [c.no_sync for c in chunks]
        config.no_sync_func = syncs[0] if len(syncs) == 1 else syncs
        if before_grad_sync is None:
            starts = [c.start_grad_sync for c in chunks]
            config.grad_sync_func = starts[0] if len(starts) == 1 else starts
        # else gradients still arrive after the schedule (before_grad_sync): each bucket launches from
        # DDP's hooks once all its gradients are in, not forced when the schedule ends
    if args.overlap_param_gather and args.use_distributed_optimizer:
        starts = [c.start_param_sync for c in chunks]
        config.param_sync_func = starts[0] if len(starts) == 1 else starts


def _reduce_losses(losses: list) -> dict:
    """Sum each reported [value, weight] over micro-batches and data-parallel ranks: value / weight."""
    if not losses or not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return {}
    out = {}
    for key in losses[0]:
        pair = torch.stack([x[key].view(-1) for x in losses]).sum(0).double()
        torch.distributed.all_reduce(pair, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        out[key] = (pair[0] / pair[1].clamp(min=1e-12)).item()
    return out


def _global_counts(tokens: int, flops: float) -> tuple[int, float]:
    """Tokens and model FLOPs of the global batch (float64 holds token counts exactly below 2^53)."""
    t = torch.tensor([tokens, flops], dtype=torch.float64, device=platform.get_platform().device)  # NCCL: on the GPU
    # the DP group without CP: the CP ranks of a DP rank share (split) the same micro-batches
    torch.distributed.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return int(t[0].item()), float(t[1].item())


def _log(args, result, reduced, grad_norm, optimizer, last_log, total_tokens, total_flops, peak, tb):
    now = time.time()
    t0, it0, tok0, flops0 = last_log
    elapsed = (now - t0) / max(result.iteration - it0, 1)
    if _is_logging_rank():
        lr = optimizer.param_groups[0]["lr"] if optimizer.param_groups else args.lr
        world = torch.distributed.get_world_size()
        tps = (total_tokens - tok0) / max(now - t0, 1e-9) / world
        tflops = (total_flops - flops0) / max(now - t0, 1e-9) / world / 1e12 if args.log_tps and total_flops else None
        mfu = tflops / peak if tflops is not None and peak else None
        scale = optimizer.get_loss_scale().item() if args.fp16 else None
        gn = float(grad_norm) if grad_norm is not None else None
        logger.info("%s", iteration_line(result.iteration, args.train_iters, result.consumed_samples,
                                         elapsed * 1000, lr, args.global_batch_size, reduced, gn,
                                         tps if args.log_tps else None, scale, tflops_per_device=tflops, mfu=mfu))
        tb.add(result.iteration, {"lm loss": reduced.get("lm loss"), LOAD_BALANCING: reduced.get(LOAD_BALANCING),
                                  "learning-rate": lr, "grad-norm": gn,
                                  "tokens-per-sec-per-device": tps, "loss-scale": scale, "mfu": mfu})
    return now, result.iteration, total_tokens, total_flops


def _maybe_evaluate(args, task, chunks, result, forward_backward, mode, seq_length) -> None:
    if not args.eval_interval or result.iteration % args.eval_interval or task.valid_data_iterator is None:
        return
    for c in chunks:
        c.eval()
    step = ForwardStep(task, mode)
    iters = [task.valid_data_iterator(0) for _ in (chunks if task.before_schedule is None else chunks[:1])]
    totals = {}
    with torch.no_grad():
        for _ in range(args.eval_iters):
            step_iters = _step_iterators(task, chunks, iters, args.num_microbatches, forward_only=True)
            losses = forward_backward(
                forward_step_func=step, data_iterator=step_iters if len(step_iters) > 1 else step_iters[0],
                model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=args.num_microbatches,
                seq_length=seq_length, micro_batch_size=args.micro_batch_size, forward_only=True)
            for k, v in _reduce_losses(losses).items():
                totals[k] = totals.get(k, 0.0) + v / args.eval_iters
    for c in chunks:
        c.train()
    if totals and _is_logging_rank():
        logger.info("validation loss at iteration %d | %s", result.iteration,
                    " | ".join(f"{k}: {v:.6E}" for k, v in totals.items()))


def _save(args, result, chunks, optimizer, scheduler) -> None:
    checkpointing.save_checkpoint(args.save, result.iteration, chunks, optimizer, scheduler,
                                  result.consumed_samples, args)
