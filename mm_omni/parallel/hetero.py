"""``--hetero-parallel``: every module takes its own tp/pp/cp from model.json (MindSpeed-MM's 异构并行).

Layout. The text decoder runs megatron's TP/PP with ``text_decoder.tp/pp/cp``; DP = world / (tp x
pp x cp). An encoder at ``tp: 1`` runs pure data parallel: the ranks of each decoder TP group split
the media of the micro-batch they share, balanced by cost, each encodes its share with a full tp=1
copy of the encoder and the features are all-gathered back in order
(:mod:`mm_omni.parallel.encoder_split`). With ``text_decoder.cp > 1`` the split runs over the TP x CP
group (every rank that shares the micro-batch) and the features' gradient is summed over the CP group
in backward, because each CP rank's loss covers only its chunk of the sequence. An encoder whose tp
equals the decoder's follows the decoder's TP group, as without the flag. Under decoder PP a tp=1
encoder has a copy on every stage and every rank of the data-parallel replica (TP x CP x PP ranks)
encodes a share of the step's media ahead of the pipeline schedule
(:mod:`mm_omni.parallel.encode_ahead`); the copies are marked ``shared`` (grad norm counts the first
stage's), left out of the later stages' checkpoints, and broadcast from the first stage after a load.

Gradients. A tp=1 encoder's parameters are replicated over the TP group, so they are marked as not
tensor-parallel (grad norm and clipping count them once, on TP rank 0, as the homogeneous run counts
each shard once). Megatron's DDP reduces them over the decoder's DP group like every parameter;
:meth:`HeteroEncoders.reduce_grads`, run after megatron's ``finalize_model_grads``, then sums them
over the TP group (under decoder PP over the TP x PP group, before megatron's reduction): in all, the sum over every rank that encoded
media (the encoders' DP group) divided by the decoder's DP size — the homogeneous run's gradient. Sums commute with megatron's
scaling, so overlapped reduction, the distributed optimizer (TP peers own the same shard), sequence
parallel and per-token loss all hold (each checked against the homogeneous run on 4 gloo ranks).
LoRA adapters are added after the model is built and would miss the marking: LoRA targets must stay
in the decoder while an encoder is split (checked).

Checkpoints: every TP rank's file holds the full tp=1 encoder, which is what ``mm-convert`` writes with
``vit_tp_size 1`` / ``audio_tp_size 1`` and ``tp_size`` = the decoder's.
"""

from __future__ import annotations

import argparse
import contextlib
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
            _fail(f"{key}.pp/cp", f"{block.pp}/{block.cp}", "an encoder runs whole on each rank (no PP, no "
                  "CP: its sequences are short); set both to 1 (tp: 1 spreads it over all ranks)")
        if block.tp not in (1, text.tp):
            _fail(f"{key}.tp", block.tp, f"an encoder runs pure data parallel (tp: 1) or follows the decoder's "
                  f"TP group (tp: text_decoder.tp = {text.tp}); set it to 1 or {text.tp}")
    split = [key for key in KINDS.values() if getattr(model_cfg, key) is not None
             and getattr(model_cfg, key).tp == 1 and text.tp * text.cp * text.pp > 1]
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

        from mm_omni.parallel.encode_ahead import EncodeAhead
        from mm_omni.parallel.encoder_split import EncoderDataParallel

        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        tp, cp = self.tp_group.size(), parallel_state.get_context_parallel_world_size()
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        # the ranks that share a micro-batch: the TP group, times the CP group when the decoder runs CP
        self.split_group = parallel_state.get_tensor_and_context_parallel_group() if cp > 1 else self.tp_group
        self.split = {kind for kind, key in KINDS.items()
                      if getattr(model_cfg, key) is not None and getattr(model_cfg, key).tp == 1
                      and tp * cp * pp > 1}
        self.grad_group = self.tp_group  # where reduce_grads sums the split encoders' gradients
        self._pgc, self.ahead, cp_group = None, None, parallel_state.get_context_parallel_group() if cp > 1 else None
        self._src = dist.get_global_rank(self.split_group, 0)
        if self.split:
            single = None
            for r in range(dist.get_world_size()):  # collective: every rank creates every group
                group = dist.new_group([r])
                if r == dist.get_rank():
                    single = group
            self._pgc = copy.copy(ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "pp", "cp"]))
            self._pgc.tp = single
            if pp > 1:  # every stage encodes: split over the whole replica, ahead of the schedule
                self.split_group, cp_group, self._src = _replica_groups()
                self.grad_group = parallel_state.get_model_parallel_group()
        vision = model_cfg.image_encoder.vision_encoder if model_cfg.image_encoder is not None else None
        merge = vision.spatial_merge_size ** 2 if vision is not None else 1
        self.dispatch = EncoderDataParallel(self.split_group, model_cfg.text_decoder.hidden_size, merge,
                                            cp_group=cp_group, balance=balance)
        if self.split and pp > 1:
            self.ahead = EncodeAhead(self.dispatch, self.split, merge)
        if dist.get_rank() == 0:
            logger.info("hetero parallel: decoder TP %d CP %d PP %d; encoders split over each %s (pure DP): "
                        "%s; following the decoder's TP: %s", tp, cp, pp,
                        "replica's TP x CP x PP ranks, ahead of the pipeline" if pp > 1 else "TP x CP group",
                        sorted(self.split) or "none",
                        sorted(set(k for k, key in KINDS.items() if getattr(model_cfg, key) is not None)
                               - self.split) or "none")

    def encodes_ahead(self, kind: str) -> bool:
        """Whether ``kind`` is encoded by every pipeline stage ahead of the schedule (a copy on each)."""
        return self.ahead is not None and kind in self.split

    def pg_collection(self, kind: str):
        """Process groups to build encoder ``kind`` with (a size-1 TP group), or None: megatron's."""
        return self._pgc if kind in self.split else None

    def encode(self, kind: str, encoder, *inputs, dummy=None) -> torch.Tensor:
        if kind not in self.split:
            return encoder(*inputs)
        if self.ahead is not None:
            return self.ahead.encode(kind, *inputs)
        return getattr(self.dispatch, kind)(encoder, *inputs, dummy=dummy)

    def prepare(self, model: torch.nn.Module) -> None:
        """Mark the split encoders' parameters as TP-replicated (a later stage's copies as ``shared``:
        grad norm counts the first stage's) and make them equal over the ranks that split them."""
        copies = bool(getattr(model, "encoder_copies", None))
        for p in self._split_params(model):
            p.tensor_model_parallel, p.partition_dim, p.partition_stride = False, -1, 1
            p.hetero_replicated = True
            if copies:
                p.shared = True
        self.sync(model)

    @torch.no_grad()
    def sync(self, model: torch.nn.Module) -> None:
        """Broadcast the split encoders from the first stage's first rank of the group (after a load:
        a later stage's checkpoint holds no copy)."""
        for p in self._split_params(model):
            dist.broadcast(p.data, src=self._src, group=self.split_group)

    def after_load(self, chunks) -> None:
        from mm_omni.training.model_setup import unwrap

        for chunk in chunks:
            self.sync(unwrap(chunk))

    def _split_params(self, model):
        for kind in (k for k in KINDS if k in self.split):  # a fixed order: the broadcasts must match
            encoder = getattr(model, KINDS[kind], None)
            if encoder is not None:
                yield from encoder.parameters()

    def before_schedule(self, chunks, batches: list, forward_only: bool) -> None:
        """Encode the step's media ahead of the pipeline schedule (decoder PP)."""
        from mm_omni.platform import get_platform
        from mm_omni.training.model_setup import unwrap

        model = unwrap(chunks[0])  # the first chunk holds the encoders (or their copies)
        self.ahead.run(model, batches, get_platform().device, training=not forward_only and model.training)

    def before_grad_sync(self, chunks) -> None:
        """Decoder PP: the encoders' backward for the step, then their gradients summed over the replica's
        TP x PP ranks *before* megatron reduces over DP: a later stage's copies sit elsewhere in its
        gradient buffer than the first stage's, so after a distributed optimizer's reduce-scatter the
        ranks would own different slices of them."""
        from mm_omni.training.model_setup import unwrap

        with contextlib.ExitStack() as stack:
            for chunk in chunks:  # overlapped reduction: not before the sum
                if hasattr(chunk, "no_sync"):
                    stack.enter_context(chunk.no_sync())
            self.ahead.backward()
        self._sum_grads(chunks)
        for chunk in chunks:  # now megatron's (overlapped) reduction may take them
            if getattr(getattr(chunk, "ddp_config", None), "overlap_grad_reduce", False):
                for p in self._split_params(unwrap(chunk)):
                    if p.requires_grad:
                        chunk.param_to_bucket_group[p].register_grad_ready(p, chunk.force_all_reduce)

    def reduce_grads(self, chunks) -> None:
        """After megatron's finalize: sum the split encoders' gradients over the TP group.

        Not over CP: megatron's DDP already reduces every gradient over the DP x CP group. Under
        decoder PP the sum ran before megatron's (:meth:`before_grad_sync`).
        """
        if self.split and self.ahead is None:
            self._sum_grads(chunks)

    def _sum_grads(self, chunks) -> None:
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
        dist.all_reduce(flat, group=self.grad_group)
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)


def hetero_encoders(args: argparse.Namespace, model_cfg) -> Optional[HeteroEncoders]:
    if not getattr(args, "hetero_parallel", False):
        return None
    return HeteroEncoders(model_cfg, balance=getattr(args, "hetero_encoder_balance", "cost"))


def _replica_groups():
    """(every rank of this data-parallel replica, the CP x PP ranks of this TP rank in it, the first
    stage's first rank): new groups, created in the same order on every rank."""
    from megatron.core import parallel_state as ps

    me = (ps.get_data_parallel_rank(), ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank(),
          ps.get_pipeline_model_parallel_rank())
    coords = [None] * dist.get_world_size()
    dist.all_gather_object(coords, me)
    replica = grad = None
    for dp in sorted({c[0] for c in coords}):
        ranks = [r for r, c in enumerate(coords) if c[0] == dp]
        group = dist.new_group(ranks)
        if dp == me[0]:
            replica = group
            src = min(ranks, key=lambda r: (coords[r][3], coords[r][1], coords[r][2]))
        for tp in sorted({coords[r][1] for r in ranks}):
            group = dist.new_group([r for r in ranks if coords[r][1] == tp])
            if (dp, tp) == me[:2]:
                grad = group
    return replica, grad, src
