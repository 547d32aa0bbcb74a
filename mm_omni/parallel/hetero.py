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
the encoders' tp sizes at 1 and ``tp_size`` = the decoder's.

What this module knows of the model: the encoder blocks model.json sets (their keys,
:func:`mm_omni.config.encoder_blocks.encoder_blocks`, are the model's attribute names), the model's
``encoders`` / ``encoder_pg_collections`` arguments and ``encoder_runner`` seam, and the encoders' item
protocol (:class:`mm_omni.models.common.encoder_api.ItemEncoder`). The checks of the sizes, before any
process group exists, are :mod:`mm_omni.config.hetero_layout`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import logging
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from mm_omni.config.encoder_blocks import encoder_blocks

logger = logging.getLogger(__name__)


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
        blocks = encoder_blocks(model_cfg)
        self.names = tuple(blocks)  # model.json's encoder blocks, in the schema's order
        # the pure-DP ones, in that order (every rank runs their collectives in it)
        self.split = tuple(name for name, block in blocks.items() if block.tp == 1 and tp * cp * pp > 1)
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
        self.dispatch = EncoderDataParallel(self.split_group, model_cfg.text_decoder.hidden_size,
                                            cp_group=cp_group, balance=balance)
        if self.split and pp > 1:
            self.ahead = EncodeAhead(self.dispatch, self.split)
        if dist.get_rank() == 0:
            logger.info("hetero parallel: decoder TP %d CP %d PP %d; encoders split over each %s (pure DP): "
                        "%s; following the decoder's TP: %s", tp, cp, pp,
                        "replica's TP x CP x PP ranks, ahead of the pipeline" if pp > 1 else "TP x CP group",
                        sorted(self.split) or "none", sorted(set(self.names) - set(self.split)) or "none")

    # -- building the model ------------------------------------------------------------------
    def encodes_ahead(self, name: str) -> bool:
        """Whether encoder ``name`` is encoded by every pipeline stage ahead of the schedule (a copy on each)."""
        return self.ahead is not None and name in self.split

    def pg_collection(self, name: str):
        """Process groups to build encoder ``name`` with (a size-1 TP group), or None: megatron's."""
        return self._pgc if name in self.split else None

    def model_kwargs(self, pre_process: bool, vp_stage: Optional[int]) -> dict:
        """The model's ``encoders`` / ``encoder_pg_collections`` for this pipeline chunk: every encoder on
        the first stage; under decoder PP also a copy of each encoder encoded ahead on every other stage's
        first chunk (it encodes a share of each step's media, :mod:`mm_omni.parallel.encode_ahead`)."""
        first_chunk = vp_stage in (None, 0)
        names = [n for n in self.names if pre_process or (first_chunk and self.encodes_ahead(n))]
        return dict(encoders=names, encoder_pg_collections={n: self.pg_collection(n) for n in names
                                                            if self.pg_collection(n) is not None})

    def build_model(self, model_cls, model_cfg, pre_process: bool = True, post_process: bool = True,
                    vp_stage: Optional[int] = None, **kwargs) -> torch.nn.Module:
        """``model_cls(model_cfg, ...)`` of this chunk with the hetero encoders (:meth:`model_kwargs`),
        prepared (:meth:`prepare`)."""
        model = model_cls(model_cfg, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
                          **self.model_kwargs(pre_process, vp_stage), **kwargs)
        self.prepare(model)
        return model

    # -- the model's encoder_runner ----------------------------------------------------------
    def owns_dummy(self, name: str) -> bool:
        """Whether the dummy forward of ``name`` runs here rather than in the model's forward."""
        return self.encodes_ahead(name)

    def encode(self, name: str, encoder, *inputs, dummy=None) -> torch.Tensor:
        if name not in self.split:
            return encoder(*inputs)
        if self.ahead is not None:
            return self.ahead.encode(name, *inputs)
        return self.dispatch.encode(name, encoder, *inputs, dummy=dummy)

    def prepare(self, model: torch.nn.Module) -> None:
        """Run the model's encoder calls through this object; mark the split encoders' parameters as
        TP-replicated (a later stage's copies as ``shared``: grad norm counts the first stage's) and
        make them equal over the ranks that split them. A later stage's copies are left out of its
        state dict (the first stage saves the encoder) and may be missing from what it loads (they are
        broadcast from the first stage)."""
        model.encoder_runner = self
        copies = [] if model.pre_process else [f"{name}." for name in model.encoders()]
        if copies:
            model.encoder_copies = copies
            model._register_state_dict_hook(functools.partial(_drop_encoder_copies, tuple(copies)))
            model.register_load_state_dict_post_hook(functools.partial(_allow_missing_encoder_copies, tuple(copies)))
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
        for chunk in chunks:
            self.sync(_inner(chunk))

    def _split_params(self, model):
        for name in self.split:  # a fixed order: the broadcasts must match
            encoder = getattr(model, name, None)
            if encoder is not None:
                yield from encoder.parameters()

    def before_schedule(self, chunks, batches: list, forward_only: bool) -> None:
        """Encode the step's media ahead of the pipeline schedule (decoder PP)."""
        from mm_omni.platform import get_platform

        model = _inner(chunks[0])  # the first chunk holds the encoders (or their copies)
        self.ahead.run(model, batches, get_platform().device, training=not forward_only and model.training)

    def before_grad_sync(self, chunks) -> None:
        """Decoder PP: the encoders' backward for the step, then their gradients summed over the replica's
        TP x PP ranks *before* megatron reduces over DP: a later stage's copies sit elsewhere in its
        gradient buffer than the first stage's, so after a distributed optimizer's reduce-scatter the
        ranks would own different slices of them."""
        with contextlib.ExitStack() as stack:
            for chunk in chunks:  # overlapped reduction: not before the sum
                if hasattr(chunk, "no_sync"):
                    stack.enter_context(chunk.no_sync())
            self.ahead.backward()
        self._sum_grads(chunks)
        for chunk in chunks:  # now megatron's (overlapped) reduction may take them
            if getattr(getattr(chunk, "ddp_config", None), "overlap_grad_reduce", False):
                for p in self._split_params(_inner(chunk)):
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


def _inner(chunk: torch.nn.Module) -> torch.nn.Module:
    """The module inside megatron's DDP wrapper."""
    return chunk.module if isinstance(chunk, DistributedDataParallel) else chunk


def _drop_encoder_copies(copies: tuple, module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k[len(prefix):].startswith(copies)]:
        del state_dict[key]


def _allow_missing_encoder_copies(copies: tuple, module, incompatible_keys):
    # a later stage's encoder copies are not in its checkpoint: they are broadcast from the first stage
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.startswith(copies)]


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
