"""The omni model as a :class:`TrainTask`: ``--mm-model`` (model.json) + ``--mm-data`` (data.json).

Parallelism: TP and DP for every module; PP for the text decoder, with the encoders on the first
stage (where the decoder's input is made; with ``--hetero-parallel``, tp=1 encoders on every stage).
``text_decoder.pipeline_num_layers`` maps onto
megatron-core's layout: equal counts, or a different first and/or last stage with equal middle
stages (``[1, 10, 10, 7]``); a nested list (VPP) must be uniform. Anything else is rejected before a
model is built, naming the key. With ``--hetero-parallel`` the sizes come from model.json's tp/pp
keys and tp=1 encoders split each micro-batch's media over the decoder's TP group
(:mod:`mm_omni.parallel.hetero`).
"""

from __future__ import annotations

import argparse
import functools
import logging
from typing import Optional

import torch
from megatron.core import parallel_state

from mm_omni.config.arguments import ArgumentsError
from mm_omni.config.model import OmniModelConfig
from mm_omni.platform import get_platform
from mm_omni.training.flops import omni_batch_flops
from mm_omni.training.model_setup import params_dtype
from mm_omni.training.task import TrainTask

logger = logging.getLogger(__name__)
# the encoders' index bookkeeping and the decoder's padding check read these on the host
_HOST_KEYS = ("image_grid_thw", "video_grid_thw", "feature_attention_mask", "attention_mask")

# what OmniModel.forward takes from a collated batch
MODEL_KEYS = ("input_ids", "attention_mask", "position_ids", "labels", "pixel_values", "image_grid_thw",
              "pixel_values_videos", "video_grid_thw", "input_features", "feature_attention_mask",
              "use_audio_in_video", "video_second_per_grid", "cu_seqlens")


def pipeline_overrides(cfg: OmniModelConfig, pp: int, vpp: Optional[int]) -> dict:
    """megatron TransformerConfig fields that reproduce ``text_decoder.pipeline_num_layers``."""
    text = cfg.text_decoder
    for name, enc in (("image_encoder.vision_encoder", cfg.image_encoder and cfg.image_encoder.vision_encoder),
                      ("audio_encoder.audio_encoder", cfg.audio_encoder and cfg.audio_encoder.audio_encoder)):
        if enc is not None and enc.pipeline_num_layers is not None:
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


def omni_task(args: argparse.Namespace, model_cfg: Optional[OmniModelConfig]) -> TrainTask:
    if model_cfg is None or not args.mm_data:
        raise ArgumentsError("--mm-model and --mm-data are required: the model.json and data.json to train on")
    from mm_omni.config.data import load_data_config
    from mm_omni.data import OmniSFTDataset, build_dataloader
    from mm_omni.models.omni import OmniModel

    data_cfg = load_data_config(args.mm_data)
    overrides = dict(pipeline_overrides(model_cfg, args.pipeline_model_parallel_size, args.vpp_size),
                     tensor_model_parallel_size=args.tensor_model_parallel_size,
                     sequence_parallel=args.sequence_parallel, pipeline_dtype=params_dtype(args),
                     calculate_per_token_loss=args.calculate_per_token_loss,
                     context_parallel_size=args.context_parallel_size)
    dataset: list = []
    # CP splits every sequence into 2 x CP chunks, sequence parallel the (CP-local) row over TP
    multiple = (2 * args.context_parallel_size if args.context_parallel_size > 1 else 1) * (
        args.tensor_model_parallel_size if args.sequence_parallel else 1)
    from mm_omni.parallel.hetero import hetero_encoders

    hetero = hetero_encoders(args, model_cfg)  # None without --hetero-parallel
    ahead = hetero is not None and hetero.ahead is not None  # encoders on every stage, ahead of the schedule

    def provider(pre_process, post_process, vp_stage):
        model = OmniModel(model_cfg, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
                          text_config_overrides=overrides, encoder_parallel=hetero)
        if hetero is not None:
            hetero.prepare(model)
        return model

    def data_iterator(consumed: int):
        if not dataset:  # scanned once, shared by the pipeline chunks
            dataset.append(OmniSFTDataset(data_cfg, args.seq_length))
        loader = build_dataloader(
            data_cfg, micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
            dp_rank=parallel_state.get_data_parallel_rank(), dp_size=parallel_state.get_data_parallel_world_size(),
            seed=args.seed, consumed_samples=consumed, num_workers=args.num_workers, dataset=dataset[0])
        return iter(loader)

    def forward(model, batch):
        if multiple > 1:
            from mm_omni.parallel.context_parallel import pad_for_context_parallel

            batch = pad_for_context_parallel(batch, multiple)
        # tensors to the accelerator (a no-op on the CPU); grid_thw and the audio mask stay on the host,
        # where the encoders' index bookkeeping runs without a device sync
        device = get_platform().device
        return model(**{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and k not in _HOST_KEYS
                        else v for k, v in batch.items() if k in MODEL_KEYS})

    return TrainTask(name="qwen2_5_omni", model_provider=provider, forward=forward, data_iterator=data_iterator,
                     seq_length=None, model_config=model_cfg,
                     count_flops=functools.partial(omni_batch_flops, model_cfg),
                     after_grad_sync=hetero.reduce_grads if hetero is not None else None,
                     after_load=hetero.after_load if hetero is not None else None,
                     before_schedule=hetero.before_schedule if ahead else None,
                     before_grad_sync=hetero.before_grad_sync if ahead else None)
