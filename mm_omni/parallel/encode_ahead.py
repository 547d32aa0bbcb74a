"""Encoders over every pipeline stage (``--hetero-parallel`` with decoder PP): a step's media encoded
ahead of the pipeline schedule by all ranks that read the same micro-batches.

Why ahead. Under megatron's pipeline schedules the stages work on different micro-batches at any
moment, so no collective that spans stages can run inside a forward. So the loop reads the step's M
micro-batches before the schedule starts (every rank of a data-parallel replica, TP x CP x PP ranks,
reads the same ones) and :meth:`EncodeAhead.run` encodes all their media: each rank a cost-balanced
share (:class:`~mm_omni.parallel.encoder_split.EncoderDataParallel` over the replica), one encoder
call per encoder, features all-gathered to every rank. What it knows of the model and its encoders is
their protocol: ``model.encoders()`` and ``model.encoder_inputs(batch)`` name them and find their inputs in a
micro-batch, :class:`~mm_omni.models.common.encoder_api.ItemEncoder` joins the micro-batches' items into
one call and counts each item's output rows. The first stage's forwards take their
micro-batch's slice of a detached copy (a leaf), so the decoder's backward leaves the features'
gradient in ``leaf.grad``.

After the schedule (megatron calls the finalize hook, before its gradient reduction)
:meth:`EncodeAhead.backward` sums that gradient over the CP x PP ranks of each TP rank (only the
first stage holds it, each CP rank for its own chunk of the sequence; TP peers hold equal copies)
and runs every rank's share backward. A rank whose share is empty, or a step without media for an
encoder, runs the encoder on a dummy input with a zero gradient, so every parameter gets a gradient on
every rank (DDP's buckets, overlapped reduction). The first stage then runs no dummy inside its
forwards.

Cost: the encoders' activations for all M micro-batches live until the step's backward (the
first-stage-only layout keeps at most PP micro-batches'). The balance is better: the whole step's
media are split over PP times more ranks.
"""

from __future__ import annotations

import functools
from collections import deque
from typing import Optional, Sequence

import torch

from mm_omni.models.common.encoder_api import dummy_forward


class EncodeAhead:
    """``dispatch``: an :class:`EncoderDataParallel` over the replica's ranks whose ``cp_group`` is the
    CP x PP group of this TP rank (the features' gradient is summed there); ``names``: the encoders
    encoded ahead, in the order every rank runs them."""

    def __init__(self, dispatch, names: Sequence[str]):
        self.dispatch, self.names = dispatch, tuple(names)
        self._ready: dict[str, deque] = {name: deque() for name in self.names}
        self._pending: list[tuple[torch.Tensor, Optional[torch.Tensor]]] = []  # (output, leaf or None)

    def run(self, model: torch.nn.Module, batches: list[dict], device: torch.device, training: bool) -> None:
        """Encode ``batches``' media (every rank of the replica, same order); ``model``: this rank's
        chunk that holds the encoders (the first stage's, or a later stage's copies)."""
        self._pending.clear()  # a forward-only pass leaves its outputs behind
        encoders = model.encoders()
        inputs_of = [model.encoder_inputs(b) for b in batches]
        for name in self.names:
            encoder = encoders[name]
            trainable = training and any(p.requires_grad for p in encoder.parameters())
            inputs, sizes, tokens = self._collect(encoder, [got[name] for got in inputs_of])
            self._ready[name].clear()
            if not sizes:
                if trainable:  # no media this step: a zero-gradient dummy keeps every parameter in the backward
                    self._pending.append((dummy_forward(encoder), None))
                continue
            dtype = next(encoder.parameters()).dtype
            with torch.set_grad_enabled(trainable):
                full = self.dispatch.encode(name, encoder, inputs[0].to(device, dtype), inputs[1],
                                            dummy=functools.partial(dummy_forward, encoder) if trainable else None)
            leaf = full.detach().requires_grad_(trainable)
            if trainable:
                self._pending.append((full, leaf))
            start = 0
            for size, n in zip(sizes, tokens):
                self._ready[name].append((size, leaf[start: start + n] if size is not None else None))
                start += n

    def owns_dummy(self, name: str) -> bool:
        """Whether this runs ``name``'s dummy forward (where a rank's share of the step is empty)."""
        return name in self.names

    def encode(self, name: str, *inputs) -> torch.Tensor:
        """The features of the next micro-batch holding media for ``name`` (the first stage's forward)."""
        if not self._ready[name]:
            raise RuntimeError(f"no {name} features encoded ahead for this micro-batch: the loop must call "
                               "EncodeAhead.run with the step's micro-batches before the schedule")
        while self._ready[name]:
            size, feats = self._ready[name].popleft()
            if size is not None:
                break
        if size is None or not torch.equal(size, inputs[1].cpu()):
            raise RuntimeError(f"{name} features encoded ahead do not match this micro-batch's media "
                               f"({None if size is None else size.tolist()} vs {inputs[1].tolist()}): micro-batches "
                               "were consumed out of order")
        return feats

    def backward(self) -> None:
        """The encoders' backward for the step (every rank of the replica, after the schedule)."""
        pending, self._pending = self._pending, []
        for out, leaf in pending:
            grad = leaf.grad if leaf is not None and leaf.grad is not None else torch.zeros_like(out)
            torch.autograd.backward(out, grad)

    # -- internals ---------------------------------------------------------------------------
    @staticmethod
    def _collect(encoder, per_batch: list):
        """All micro-batches' ``(data, sizes)`` for ``encoder`` as one call, and per micro-batch its item
        sizes (None without such media) and output rows."""
        parts, sizes, tokens = [], [], []
        for got in per_batch:
            if got is None:
                sizes.append(None)
                tokens.append(0)
                continue
            x, size = got[0], got[1].cpu()
            parts.append((x, size))
            sizes.append(size)
            tokens.append(sum(encoder.item_tokens(size)))
        if not parts:
            return None, [], []
        return encoder.join_items(parts), sizes, tokens
