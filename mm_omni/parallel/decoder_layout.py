"""The decoder's tokens spread over ranks: the context-parallel split and the sequence-parallel scatter.

:func:`decoder_layout` gives the token layout a decoder forward runs with (its ``layout`` argument,
see :mod:`mm_omni.models.text.layout`), from the decoder's own config and process groups:

- context parallel (``context_parallel_size > 1``): this rank keeps its zig-zag share of every
  sequence (:mod:`mm_omni.models.common.context_parallel`) of the input embeddings (after the media
  scatter, which needs the full sequence), of the positions and of the targets (labels are shifted on
  the full sequence first); attention gets the mask of the share against the gathered keys, or the
  packed-sequence parameters of a packed row; the loss is the mean over the whole sequence, its
  gradient this rank's share (:func:`mm_omni.parallel.context_parallel.mean_loss_over_group`);
- sequence parallel: the (CP-local) input is scattered over the TP ranks along the sequence; the
  decoder's output layer gathers it back before the loss.

:func:`split_multiple` is what every sequence must be a multiple of for both to cut it evenly
(:func:`mm_omni.parallel.context_parallel.pad_for_context_parallel` pads a batch to it).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from megatron.core import tensor_parallel

from mm_omni.models.common.context_parallel import split_for_context_parallel
from mm_omni.models.text.layout import TokenLayout
from mm_omni.parallel.context_parallel import mean_loss_over_group


class ParallelTokenLayout(TokenLayout):
    """This rank's zig-zag share of the tokens over ``cp_group`` (None: all), scattered over ``sp_group``
    (None: not scattered)."""

    def __init__(self, s: int, b: int, device, cu_seqlens: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, *, cp_group=None, sp_group=None):
        super().__init__(s, b, device, cu_seqlens, attention_mask)
        self.split = split_for_context_parallel(cp_group, s, cu_seqlens, device)
        self.sp_group = sp_group

    def input(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.split is not None:  # before the sequence-parallel scatter: SP cuts the CP-local row
            hidden = self.split.take(hidden, 0)
        if self.sp_group is not None:
            hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden, group=self.sp_group)
        return hidden

    def attention(self):
        if self.split is None:
            return super().attention()
        if self.cu_seqlens is not None:
            return None, self.split.packed_params()
        keep = None if self.attention_mask is None else self.attention_mask.to(self.device)
        return self.split.attention_mask(keep), None

    def positions(self, position_ids):
        position_ids = super().positions(position_ids)
        return position_ids if self.split is None else self.split.take(position_ids.to(self.device), 2)

    def targets(self, labels):
        targets = super().targets(labels)
        return targets if self.split is None else self.split.take(targets, 1)

    def loss(self, per_token_loss, loss_mask):
        if self.split is None:
            return super().loss(per_token_loss, loss_mask)
        return mean_loss_over_group(per_token_loss, loss_mask, self.split.group)

    def segments(self):
        seg = super().segments()
        return seg if seg is None or self.split is None else self.split.take(seg, 1)


def decoder_layout(decoder: torch.nn.Module) -> Callable[..., TokenLayout]:
    """The ``layout`` for ``decoder``'s forwards under its config's context and sequence parallelism."""
    config = decoder.config
    cp_group = decoder.cp_group if config.context_parallel_size > 1 else None
    sp_group = decoder.tp_group if config.sequence_parallel else None
    if cp_group is None and sp_group is None:
        return TokenLayout
    return functools.partial(ParallelTokenLayout, cp_group=cp_group, sp_group=sp_group)


def split_multiple(context_parallel_size: int, tensor_parallel_size: int, sequence_parallel: bool) -> int:
    """What every sequence's length must be a multiple of: CP cuts it into 2 x CP chunks, sequence
    parallel the (CP-local) row over TP."""
    cp = 2 * context_parallel_size if context_parallel_size > 1 else 1
    return cp * (tensor_parallel_size if sequence_parallel else 1)
