"""Build this rank's model chunks (pipeline stages / virtual chunks), set precision, wrap in megatron DDP.

Mixed precision is megatron's "fp16/bf16 params + fp32 main params in the optimizer": the chunks are
cast to bf16/fp16 here (what ``Float16Module`` does, without its wrapper: our last stage returns a
structured output that ``Float16Module``'s output cast does not handle, and the loss is computed in
fp32 by the model anyway), gradients are reduced in fp32, and megatron's mixed-precision optimizer
keeps the fp32 master copy.
"""

from __future__ import annotations

import argparse
import logging

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.enums import ModelType

from mm_omni import platform
from mm_omni.training.task import TrainTask

logger = logging.getLogger(__name__)


def params_dtype(args: argparse.Namespace) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def build_model(args: argparse.Namespace, task: TrainTask) -> list[DistributedDataParallel]:
    """One chunk per virtual pipeline stage (one when there is no VPP), each wrapped in megatron DDP."""
    vpp = args.vpp_size
    chunks = []
    for vp in range(vpp or 1):
        vp_stage = vp if vpp else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        chunk = task.model_provider(pre, post, vp_stage)
        chunk.model_type = ModelType.encoder_or_decoder
        chunks.append(chunk)
    if getattr(args, "lora_target_modules", None):
        from mm_omni.lora.inject import add_lora_from_args

        add_lora_from_args(chunks, args)  # adapters on the targets; only they train
    dtype = params_dtype(args)
    for chunk in chunks:
        for p in chunk.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(p)
        found = {p.dtype for p in chunk.parameters()}
        if found != {dtype}:
            # model.json's per-module bf16/params_dtype build the modules; training precision is the flag's
            logger.info("casting model parameters %s -> %s (--bf16/--fp16 decide the training precision)",
                        sorted(str(d) for d in found), dtype)
            chunk.to(dtype)
        chunk.to(platform.get_platform().device)  # built on the host (use_cpu_initialization); a no-op on the CPU
        _configure(chunk.config, args, dtype, variable_lengths=task.seq_length is None)
        if getattr(args, "encoder_cuda_graphs", False):
            from mm_omni.models.common.cuda_graphs import enable_encoder_cuda_graphs

            logger.info("encoder CUDA graphs on for %d encoder(s) of this stage", enable_encoder_cuda_graphs(chunk))
    _log_params(chunks)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=dtype != torch.float32 or args.accumulate_allreduce_grads_in_fp32,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        use_distributed_optimizer=args.use_distributed_optimizer,
        check_for_nan_in_grad=False,
        average_in_collective=False,
    )
    return [
        DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def _configure(config, args: argparse.Namespace, dtype: torch.dtype, variable_lengths: bool) -> None:
    """Settings the schedules read from the model's TransformerConfig."""
    config.calculate_per_token_loss = args.calculate_per_token_loss
    config.params_dtype = config.pipeline_dtype = dtype
    config.bf16, config.fp16 = args.bf16, args.fp16
    # batches of different lengths: the pipeline sends each tensor's shape ahead of it
    config.variable_seq_lengths = args.variable_seq_lengths or variable_lengths or config.variable_seq_lengths
    if platform.get_platform().dist_backend == "gloo":
        # batch_isend_irecv on gloo posts its ops in list order and gloo matches messages per peer in
        # posting order; with PP=2 + VPP the previous and next stage are the same peer, so a batched
        # exchange delivers gradients into activation buffers (measured). megatron's unbatched path
        # orders sends/receives by even/odd rank, which matches on both sides.
        config.batch_p2p_comm = False
    if args.recompute_granularity and config.recompute_granularity is None:
        config.recompute_granularity = args.recompute_granularity
        config.recompute_method = args.recompute_method
        config.recompute_num_layers = args.recompute_num_layers


def _log_params(chunks) -> None:
    total = sum(p.numel() for c in chunks for p in c.parameters())
    trainable = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
    logger.info("rank %d (tp %d, pp %d, ep %d): %d parameters, %d trainable, %d frozen",
                torch.distributed.get_rank(), parallel_state.get_tensor_model_parallel_rank(),
                parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_expert_model_parallel_rank(),
                total, trainable, total - trainable)


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP."""
    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk


def has_trainable_params(chunks) -> bool:
    return any(p.requires_grad for c in chunks for p in c.parameters())
