"""The omni model as a :class:`TrainTask`: ``--mm-model`` (model.json) + ``--mm-data`` (data.json).

Parallelism: TP and DP for every module; PP for the text decoder, with the encoders on the first
stage (where the decoder's input is made; with ``--hetero-parallel``, tp=1 encoders on every stage).
``text_decoder.pipeline_num_layers`` maps onto
megatron-core's layout: equal counts, or a different first and/or last stage with equal middle
stages (``[1, 10, 10, 7]``); a nested list (VPP) must be uniform. Anything else is rejected before a
model is built, naming the key. With ``--hetero-parallel`` the sizes come from model.json's tp/pp
keys and tp=1 encoders split each micro-batch's media over the decoder's TP group
(:mod:`mm_omni.parallel.hetero`, which also builds each chunk's encoders). Each forward runs with the
decoder's token layout (:func:`mm_omni.parallel.decoder_layout.decoder_layout`: the context-parallel
split and the sequence-parallel scatter of its input).
"""

from __future__ import annotations

import argparse
import functools
import logging
from typing import Optional

import torch
from megatron.core import parallel_state

from mm_omni.config.arguments import ArgumentsError
from mm_omni.config.encoder_blocks import encoder_stacks
from mm_omni.config.model import OmniModelConfig
from mm_omni.platform import get_platform
from mm_omni.training.model_setup import params_dtype, unwrap
from mm_omni.training.task import TrainTask

logger = logging.getLogger(__name__)


def pipeline_overrides(cfg: OmniModelConfig, pp: int, vpp: Optional[int]) -> dict:
    """megatron TransformerConfig fields that reproduce ``text_decoder.pipeline_num_layers``."""
    text = cfg.text_decoder
    for name, enc in encoder_stacks(cfg).items():
        if enc.pipeline_num_layers is not None:
            flat = [n for chunk in enc.stage_layers() for n in chunk]
            if any(flat[1:]):
                raise ArgumentsError(f"{name}.pipeline_num_layers={enc.pipeline_num_layers}: encoders run whole on "
                                     "the first pipeline stage here; put all their layers there, e.g. [32, 0]")
    over = {"pipeline_model_parallel_size": pp, "virtual_pipeline_model_parallel_size": vpp}
    if pp == 1:
        return over
    chunks = text.stage_layers() if text.pipeline_num_layers is not None else None
    if chunks is None:
        if text.num_layers % (pp * (vpp or 1)):
            raise ArgumentsError(f"text_decoder.num_layers={text.num_layers} is not divisible by PP x VPP = "
                                 f"{pp * (vpp or 1)}: set text_decoder.pipeline_num_layers")
        return over
    if len(chunks[0]) != pp:
        raise ArgumentsError(f"text_decoder.pipeline_num_layers={text.pipeline_num_layers} has {len(chunks[0])} "
                             f"stages but --pipeline-model-parallel-size is {pp}: give one count per stage")
    if len(chunks) > 1:
        if len({n for c in chunks for n in c}) != 1:
            raise ArgumentsError(f"text_decoder.pipeline_num_layers={text.pipeline_num_layers}: virtual pipeline "
                                 "chunks must hold equal layer counts here")
        return over
    layers = chunks[0]
    middle = layers[1:-1]
    if len(set(middle)) > 1:
        raise ArgumentsError(f"text_decoder.pipeline_num_layers={layers}: the middle stages must hold equal "
                             "counts (megatron-core's layout: first, last, and uniform middle stages)")
    if len(set(layers)) > 1:
        over.update(num_layers_in_first_pipeline_stage=layers[0], num_layers_in_last_pipeline_stage=layers[-1])
    return over


def omni_task(args: argparse.Namespace, model_cfg: Optional[OmniModelConfig], model_class=None,
              batch_flops=None) -> TrainTask:
    """The task of a model built like :class:`~mm_omni.models.omni.OmniModel`: ``model_class`` and
    ``batch_flops`` default to the registry entry of ``args.model_family`` (its ``model_ref`` / ``flops_ref``: a
    family's subclass with its own encoder stacks), else OmniModel's."""
    if model_cfg is None or not args.mm_data:
        raise ArgumentsError("--mm-model and --mm-data are required: the model.json and data.json to train on")
    from mm_omni.config.data import load_data_config, packing_budget
    from mm_omni.data import OmniSFTDataset, build_dataloader
    from mm_omni.models.omni import OmniModel
    from mm_omni.models.omni_flops import omni_batch_flops
    from mm_omni.parallel.context_parallel import pad_for_context_parallel
    from mm_omni.parallel.decoder_layout import decoder_layout, split_multiple
    from mm_omni.parallel.hetero import hetero_encoders

    family_name = getattr(args, "model_family", None)
    if family_name is not None:
        from mm_omni.registry import by_name

        family = by_name(family_name)
        model_class, batch_flops = model_class or family.load("model"), batch_flops or family.load("flops")
    model_class = model_class or OmniModel
    batch_flops = batch_flops or omni_batch_flops

    data_cfg = load_data_config(args.mm_data)
    packing_budget(data_cfg, args.seq_length)  # budget packing without --seq-length fails here, before any model
    overrides = dict(pipeline_overrides(model_cfg, args.pipeline_model_parallel_size, args.vpp_size),
                     tensor_model_parallel_size=args.tensor_model_parallel_size,
                     sequence_parallel=args.sequence_parallel, pipeline_dtype=params_dtype(args),
                     calculate_per_token_loss=args.calculate_per_token_loss,
                     context_parallel_size=args.context_parallel_size,
                     expert_model_parallel_size=args.expert_model_parallel_size,
                     expert_tensor_parallel_size=args.expert_tensor_parallel_size)
    dataset: list = []
    multiple = split_multiple(args.context_parallel_size, args.tensor_model_parallel_size, args.sequence_parallel)
    hetero = hetero_encoders(args, model_cfg)  # None without --hetero-parallel
    ahead = hetero is not None and hetero.ahead is not None  # encoders on every stage, ahead of the schedule

    def provider(pre_process, post_process, vp_stage):
        if hetero is not None:  # which encoders this chunk holds, on which groups, and how their calls run
            return hetero.build_model(model_class, model_cfg, pre_process, post_process, vp_stage,
                                      text_config_overrides=overrides)
        return model_class(model_cfg, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
                         text_config_overrides=overrides)

    def data_iterator(consumed: int):
        if not dataset:  # scanned once, shared by the pipeline chunks
            dataset.append(OmniSFTDataset(data_cfg, args.seq_length))
        loader = build_dataloader(
            data_cfg, micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
            dp_rank=parallel_state.get_data_parallel_rank(), dp_size=parallel_state.get_data_parallel_world_size(),
            seed=args.seed, consumed_samples=consumed, num_workers=args.num_workers, dataset=dataset[0],
            segment_multiple=multiple)
        return iter(loader)

    def forward(model, batch):
        if multiple > 1:
            batch = pad_for_context_parallel(batch, multiple)
        # tensors to the accelerator (a no-op on the CPU); the model's host keys stay on the host, where
        # the encoders' index bookkeeping and the decoder's padding check run without a device sync
        device = get_platform().device
        inputs = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and k not in model_class.HOST_KEYS
                  else v for k, v in batch.items() if k in model_class.INPUT_KEYS}
        return model(**inputs, layout=decoder_layout(unwrap(model).text_decoder))

    return TrainTask(name=getattr(args, "model_family", "qwen2_5_omni"), model_provider=provider, forward=forward, data_iterator=data_iterator,
                     seq_length=None, model_config=model_cfg,
                     count_flops=functools.partial(batch_flops, model_cfg),
                     after_grad_sync=hetero.reduce_grads if hetero is not None else None,
                     after_load=hetero.after_load if hetero is not None else None,
                     before_schedule=hetero.before_schedule if ahead else None,
                     before_grad_sync=hetero.before_grad_sync if ahead else None)
