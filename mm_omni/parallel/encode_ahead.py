"""Encoders over every pipeline stage (``--hetero-parallel`` with decoder PP): a step's media encoded
ahead of the pipeline schedule by all ranks that read the same micro-batches.

Why ahead. Under megatron's pipeline schedules the stages work on different micro-batches at any
moment, so no collective that spans stages can run inside a forward. So the loop reads the step's M
micro-batches before the schedule starts (every rank of a data-parallel replica, TP x CP x PP ranks,
reads the same ones) and :meth:`EncodeAhead.run` encodes all their media: each rank a cost-balanced
share (:class:`~mm_omni.parallel.encoder_split.EncoderDataParallel` over the replica), one encoder
call per kind, features all-gathered to every rank. The first stage's forwards take their
micro-batch's slice of a detached copy (a leaf), so the decoder's backward leaves the features'
gradient in ``leaf.grad``.

After the schedule (megatron calls the finalize hook, before its gradient reduction)
:meth:`EncodeAhead.backward` sums that gradient over the CP x PP ranks of each TP rank (only the
first stage holds it, each CP rank for its own chunk of the sequence; TP peers hold equal copies)
and runs every rank's share backward. A rank whose share is empty, or a step without media of a
kind, runs the encoder on a dummy input with a zero gradient, so every parameter gets a gradient on
every rank (DDP's buckets, overlapped reduction). The first stage then runs no dummy inside its
forwards.

Cost: the encoders' activations for all M micro-batches live until the step's backward (the
first-stage-only layout keeps at most PP micro-batches'). The balance is better: the whole step's
media are split over PP times more ranks.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Optional

import torch

from mm_omni.models.audio.front_end import conv_output_lengths
from mm_omni.models.omni import audio_inputs, vision_inputs

KIND_ATTR = {"vision": "image_encoder", "audio": "audio_encoder"}


class EncodeAhead:
    """``dispatch``: an :class:`EncoderDataParallel` over the replica's ranks whose ``cp_group`` is the
    CP x PP group of this TP rank (the features' gradient is summed there); ``kinds``: the encoders
    encoded ahead."""

    def __init__(self, dispatch, kinds: set[str], merge: int):
        self.dispatch, self.kinds, self.merge = dispatch, kinds, merge
        self._ready: dict[str, deque] = {k: deque() for k in kinds}
        self._pending: list[tuple[torch.Tensor, Optional[torch.Tensor]]] = []  # (output, leaf or None)

    def run(self, model: torch.nn.Module, batches: list[dict], device: torch.device, training: bool) -> None:
        """Encode ``batches``' media (every rank of the replica, same order); ``model``: this rank's
        chunk that holds the encoders (the first stage's, or a later stage's copies)."""
        self._pending.clear()  # a forward-only pass leaves its outputs behind
        for kind in ("vision", "audio"):
            if kind not in self.kinds:
                continue
            encoder = getattr(model, KIND_ATTR[kind])
            trainable = training and any(p.requires_grad for p in encoder.parameters())
            dummy: Callable[[], torch.Tensor] = getattr(model, f"_dummy_{kind}")
            inputs, sizes, tokens = self._collect(kind, batches)
            self._ready[kind].clear()
            if not sizes:
                if trainable:  # no media this step: a zero-gradient dummy keeps every parameter in the backward
                    self._pending.append((dummy(), None))
                continue
            dtype = next(encoder.parameters()).dtype
            with torch.set_grad_enabled(trainable):
                full = getattr(self.dispatch, kind)(encoder, inputs[0].to(device, dtype), inputs[1],
                                                    dummy=dummy if trainable else None)
            leaf = full.detach().requires_grad_(trainable)
            if trainable:
                self._pending.append((full, leaf))
            start = 0
            for size, n in zip(sizes, tokens):
                self._ready[kind].append((size, leaf[start: start + n] if size is not None else None))
                start += n

    def encode(self, kind: str, *inputs) -> torch.Tensor:
        """The features of the next micro-batch holding ``kind`` media (the first stage's forward)."""
        if not self._ready[kind]:
            raise RuntimeError(f"no {kind} features encoded ahead for this micro-batch: the loop must call "
                               "EncodeAhead.run with the step's micro-batches before the schedule")
        while self._ready[kind]:
            size, feats = self._ready[kind].popleft()
            if size is not None:
                break
        if size is None or not torch.equal(size, inputs[1].cpu()):
            raise RuntimeError(f"{kind} features encoded ahead do not match this micro-batch's media "
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
    def _collect(self, kind: str, batches: list[dict]):
        """All micro-batches' ``kind`` inputs as one encoder call, and per micro-batch its sizes
        (grid_thw / mel frames, None without such media) and feature count."""
        parts, sizes, tokens = [], [], []
        for b in batches:
            if kind == "vision":
                got = vision_inputs(b.get("pixel_values"), b.get("image_grid_thw"), b.get("pixel_values_videos"),
                                    b.get("video_grid_thw"))
            else:
                got = audio_inputs(b.get("input_features"), b.get("feature_attention_mask"))
            if got is None:
                sizes.append(None)
                tokens.append(0)
                continue
            x, size = got[0], got[1].cpu()
            if kind == "audio" and x.dim() == 3:  # padded [n, mel, T] -> transformers' flat [mel, sum(T_i)]
                x = torch.cat([clip[:, :n] for clip, n in zip(x, size.tolist())], dim=1)
            parts.append((x, size))
            sizes.append(size)
            if kind == "vision":
                tokens.append(int(size.prod(-1).sum()) // self.merge)
            else:
                tokens.append(int(conv_output_lengths(size)[1].sum()))
        if not parts:
            return None, [], []
        dim = 1 if kind == "audio" else 0
        return (torch.cat([x for x, _ in parts], dim=dim), torch.cat([s for _, s in parts])), sizes, tokens
