"""Adam (megatron-core's optimizer, distributed when asked), its lr schedule, and the dummy optimizer.

A rank whose parameters are all frozen (e.g. a pipeline stage that holds only frozen encoders) has
nothing to step. MindSpeed-MM requires ``--enable-dummy-optimizer`` there; so do we. With it,
megatron-core's own stub optimizer is used on that rank: it steps nothing but still joins the
collectives of the step (grad-norm and inf checks), so the other ranks do not hang.
"""

from __future__ import annotations

import argparse
import logging

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from mm_omni import platform
from mm_omni.config.arguments import ArgumentsError
from mm_omni.training.model_setup import has_trainable_params, params_dtype

logger = logging.getLogger(__name__)


def build_optimizer(args: argparse.Namespace, chunks):
    if not has_trainable_params(chunks):
        if not args.enable_dummy_optimizer:
            raise ArgumentsError(
                f"rank {torch.distributed.get_rank()} holds only frozen parameters (model.json 'freeze'): "
                "add --enable-dummy-optimizer so that it runs a dummy optimizer")
        logger.info("rank %d: all parameters frozen: dummy optimizer (--enable-dummy-optimizer)",
                    torch.distributed.get_rank())
    config = OptimizerConfig(
        optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.bf16, fp16=args.fp16, params_dtype=params_dtype(args),
        loss_scale=args.loss_scale, initial_loss_scale=args.initial_loss_scale,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, chunks)
    if platform.get_platform().name == platform.CUDA:
        fused = use_fused_adam(torch_optimizers(optimizer))
        if fused:
            logger.info("Adam: torch's fused kernel (%d optimizer(s)); megatron-core builds the multi-pass foreach one "
                        "without apex/TransformerEngine", fused)
    return optimizer


def torch_optimizers(optimizer) -> list:
    """The torch optimizers inside megatron-core's (chained) optimizer."""
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [o.optimizer for o in inner if isinstance(getattr(o, "optimizer", None), torch.optim.Optimizer)]


def use_fused_adam(optimizers) -> int:
    """Switch torch Adam/AdamW to its fused single-kernel update (read from the param groups at each step).

    Measured on an H100 (7B widths, reduced depth, 2.4 B fp32 main parameters): the foreach AdamW that
    megatron-core falls back to makes ~8 passes over the optimizer state and took 72 ms of a 165 ms
    iteration. The fused kernel makes one. Same update up to fp32 rounding order.
    """
    count = 0
    for opt in optimizers:
        if isinstance(opt, torch.optim.Adam):  # AdamW too
            for group in opt.param_groups:
                group["fused"], group["foreach"] = True, False
            count += 1
    return count


def build_scheduler(args: argparse.Namespace, optimizer) -> OptimizerParamScheduler:
    """Megatron's schedule, counted in iterations (one ``step(1)`` per optimizer step)."""
    decay = args.lr_decay_iters or args.train_iters
    warmup = int(args.lr_warmup_fraction * decay) if args.lr_warmup_fraction is not None else args.lr_warmup_iters
    return OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=decay, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=args.train_iters,
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False, wsd_decay_steps=None, lr_wsd_decay_style=None,
    )
