"""``--hetero-parallel``: every module takes its own tp/pp/cp from model.json (MindSpeed-MM's 异构并行).

Layout. The text decoder runs megatron's TP/PP with ``text_decoder.tp/pp/cp``; DP = world / (tp x
pp x cp). An encoder at ``tp: 1`` runs pure data parallel: the ranks of each decoder TP group split
the media of the micro-batch they share, balanced by cost, each encodes its share with a full tp=1
copy of the encoder and the features are all-gathered back in order
(:mod:`mm_omni.parallel.encoder_split`). With ``text_decoder.cp > 1`` the split runs over the TP x CP
group (every rank that shares the micro-batch) and the features' gradient is summed over the CP group
in backward, because each CP rank's loss covers only its chunk of the sequence. An encoder whose tp
equals the decoder's follows the decoder's TP group, as without the flag. Encoders run on the first
pipeline stage (under decoder PP the later stages' ranks do not encode: not supported yet).

Gradients. A tp=1 encoder's parameters are replicated over the TP group, so they are marked as not
tensor-parallel (grad norm and clipping count them once, on TP rank 0, as the homogeneous run counts
each shard once). Megatron's DDP reduces them over the decoder's DP group like every parameter;
:meth:`HeteroEncoders.reduce_grads`, run after megatron's ``finalize_model_grads``, then sums them
over the TP group: in all, the sum over every rank that encoded media (the encoders' DP group)
divided by the decoder's DP size — the homogeneous run's gradient. Sums commute with megatron's
scaling, so overlapped reduction, the distributed optimizer (TP peers own the same shard), sequence
parallel and per-token loss all hold (each checked against the homogeneous run on 4 gloo ranks).
LoRA adapters are added after the model is built and would miss the marking: LoRA targets must stay
in the decoder while an encoder is split (checked).

Checkpoints: every TP rank's file holds the full tp=1 encoder, which is what ``mm-convert`` writes with
``vit_tp_size 1`` / ``audio_tp_size 1`` and ``tp_size`` = the decoder's.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
from typing import Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from mm_omni.config.arguments import ArgumentsError

logger = logging.getLogger(__name__)

KINDS = {"vision": "image_encoder", "audio": "audio_encoder"}


def _fail(key: str, value, fix: str) -> None:
    raise ArgumentsError(f"{key}={value}: {fix}")


def resolve_layout(args: argparse.Namespace, model_cfg, world_size: int) -> None:
    """Check the hetero layout and put the decoder's sizes into ``args`` (before any model exists)."""
    if model_cfg is None:
        _fail("--hetero-parallel", True, "the per-module sizes come from model.json: also give --mm-model")
    sizes = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size)
    if sizes != (1, 1, 1):
        _fail("--hetero-parallel", True, f"the launcher's TP, PP and CP must all be 1 (got {sizes}): the sizes "
              "come from model.json (text_decoder.tp/pp/cp); set TP=1 PP=1 CP=1 in the script")
    if args.hetero_encoder_mbs_scale != 1:
        _fail("--hetero-encoder-mbs-scale", args.hetero_encoder_mbs_scale,
              "the encoders here encode each decoder micro-batch's media, split across its TP group; "
              "leave it at 1")
    text = model_cfg.text_decoder
    for kind, key in KINDS.items():
        block = getattr(model_cfg, key)
        if block is None:
            continue
        if block.pp != 1 or block.cp != 1:
            _fail(f"{key}.pp/cp", f"{block.pp}/{block.cp}", "the encoders run whole (no PP, no CP) on the "
                  "first pipeline stage; set both to 1")
        if block.tp not in (1, text.tp):
            _fail(f"{key}.tp", block.tp, f"an encoder runs pure data parallel (tp: 1) or follows the decoder's "
                  f"TP group (tp: text_decoder.tp = {text.tp}); set it to 1 or {text.tp}")
    split = [key for key in KINDS.values() if getattr(model_cfg, key) is not None
             and getattr(model_cfg, key).tp == 1 and text.tp * text.cp > 1]
    if split and getattr(args, "lora_target_modules", None):
        _check_lora_targets(args.lora_target_modules, split)
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = text.tp, text.pp
    args.context_parallel_size = text.cp


def _check_lora_targets(values, split: list[str]) -> None:
    """LoRA adapters are added after the model is built, so they miss the tp=1 encoders' replication."""
    from mm_omni.lora.targets import LoraTargetError, parse_targets

    try:
        targets = parse_targets(values)
    except LoraTargetError:
        return  # the LoRA checks report it
    for t in targets:
        if not t.path.startswith("text_decoder"):
            _fail("--lora-target-modules", t.text, f"with --hetero-parallel, LoRA on the tp=1 encoders "
                  f"({', '.join(split)}) is not supported yet; target the decoder only, e.g. "
                  f"text_decoder.{t.text.rpartition('.')[2]}")


def check_batch(args: argparse.Namespace, model_cfg, world_size: int) -> None:
    """MindSpeed-MM's rule: the decoder's DP x MBS must be divisible by every encoder's DP (world / its tp)."""
    for key in KINDS.values():
        block = getattr(model_cfg, key)
        if block is None:
            continue
        enc_dp = world_size // block.tp
        if (args.data_parallel_size * args.micro_batch_size) % enc_dp:
            _fail("--micro-batch-size", args.micro_batch_size,
                  f"with --hetero-parallel the decoder's DP x MBS = {args.data_parallel_size} x "
                  f"{args.micro_batch_size} must be divisible by {key}'s DP = world {world_size} / {key}.tp "
                  f"{block.tp} = {enc_dp} (so every encoder rank gets an equal share); raise --micro-batch-size "
                  f"to a multiple of {enc_dp // math.gcd(enc_dp, args.data_parallel_size)}")


class HeteroEncoders:
    """Runtime side: groups, the media split, parameter marking and the gradient sum.

    Build it after megatron's groups exist (every rank, same order: it creates process groups).
    """

    def __init__(self, model_cfg, balance: str = "cost"):
        from megatron.core import parallel_state
        from megatron.core.process_groups_config import ProcessGroupCollection

        from mm_omni.parallel.encoder_split import EncoderDataParallel

        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        tp, cp = self.tp_group.size(), parallel_state.get_context_parallel_world_size()
        # the ranks that share a micro-batch: the TP group, times the CP group when the decoder runs CP
        self.split_group = parallel_state.get_tensor_and_context_parallel_group() if cp > 1 else self.tp_group
        self.split = {kind for kind, key in KINDS.items()
                      if getattr(model_cfg, key) is not None and getattr(model_cfg, key).tp == 1 and tp * cp > 1}
        self._pgc = None
        if self.split:
            single = None
            for r in range(dist.get_world_size()):  # collective: every rank creates every group
                group = dist.new_group([r])
                if r == dist.get_rank():
                    single = group
            self._pgc = copy.copy(ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "pp", "cp"]))
            self._pgc.tp = single
        vision = model_cfg.image_encoder.vision_encoder if model_cfg.image_encoder is not None else None
        merge = vision.spatial_merge_size ** 2 if vision is not None else 1
        self.dispatch = EncoderDataParallel(self.split_group, model_cfg.text_decoder.hidden_size, merge,
                                            cp_group=parallel_state.get_context_parallel_group() if cp > 1 else None,
                                            balance=balance)
        if dist.get_rank() == 0:
            logger.info("hetero parallel: decoder TP %d CP %d; encoders split over each TP x CP group (pure DP): "
                        "%s; following the decoder's TP: %s", tp, cp, sorted(self.split) or "none",
                        sorted(set(k for k, key in KINDS.items() if getattr(model_cfg, key) is not None)
                               - self.split) or "none")

    def pg_collection(self, kind: str):
        """Process groups to build encoder ``kind`` with (a size-1 TP group), or None: megatron's."""
        return self._pgc if kind in self.split else None

    def encode(self, kind: str, encoder, *inputs, dummy=None) -> torch.Tensor:
        if kind not in self.split:
            return encoder(*inputs)
        return getattr(self.dispatch, kind)(encoder, *inputs, dummy=dummy)

    def prepare(self, model: torch.nn.Module) -> None:
        """Mark the split encoders' parameters as TP-replicated and make them equal over the TP group."""
        for kind in (k for k in KINDS if k in self.split):  # a fixed order: the broadcasts must match
            encoder = getattr(model, KINDS[kind], None)
            if encoder is None:
                continue
            src = dist.get_global_rank(self.split_group, 0)
            for p in encoder.parameters():
                p.tensor_model_parallel, p.partition_dim, p.partition_stride = False, -1, 1
                p.hetero_replicated = True
                with torch.no_grad():
                    dist.broadcast(p.data, src=src, group=self.split_group)

    def reduce_grads(self, chunks) -> None:
        """After megatron's finalize: sum the split encoders' gradients over the TP group.

        Not over CP: megatron's DDP already reduces every gradient over the DP x CP group.
        """
        if not self.split:
            return
        grads = []
        for chunk in chunks:
            for p in chunk.parameters():
                if getattr(p, "hetero_replicated", False) and p.requires_grad:
                    grad = getattr(p, "main_grad", None)
                    grads.append(grad if grad is not None else p.grad)
        grads = [g for g in grads if g is not None]
        if not grads:
            return
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.tp_group)
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)


def hetero_encoders(args: argparse.Namespace, model_cfg) -> Optional[HeteroEncoders]:
    if not getattr(args, "hetero_parallel", False):
        return None
    return HeteroEncoders(model_cfg, balance=getattr(args, "hetero_encoder_balance", "cost"))
