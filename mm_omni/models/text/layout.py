"""Where the decoder's tokens of one forward sit, and what follows for its attention mask, positions,
targets and loss.

:class:`TokenLayout` is the layout of one rank that holds every token: the decoder builds one per
forward, ``layout(s, b, device, cu_seqlens, attention_mask)``, and asks it for the mask (or packed
sequence parameters), the rotary positions, the shifted targets and the loss mean. A layout that
spreads the tokens over ranks (the context-parallel split, the sequence-parallel scatter) is a
subclass made by the parallel code (:mod:`mm_omni.parallel.decoder_layout`); the decoder itself only
stacks its layers.

Batches come either padded, ``[b, s]`` with an ``attention_mask`` (left or right padding; right
padding needs no mask beyond causality, see :func:`is_right_padded`), or packed, ``b = 1`` with
``cu_seqlens`` marking where each sequence starts (one varlen attention call, no padding).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from mm_omni.models.common.attention import packed_params
from mm_omni.models.text.loss import mean_loss, shift_labels


def padding_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """HF-style ``[b, s]`` keep-mask (1 = token) -> megatron's causal mask ``[b, 1, s, s]`` (True = masked).

    Padding *queries* keep their own diagonal so no row is fully masked (a fully masked row is NaN
    in some SDPA kernels, and a NaN there would leak into gradients through 0 * NaN); real tokens
    never see padding keys, so their outputs are exact for left and right padding alike.
    """
    b, s = attention_mask.shape
    keep = attention_mask.bool()
    causal = torch.ones(s, s, dtype=torch.bool, device=keep.device).tril()
    allowed = (causal & keep[:, None, :]) | torch.eye(s, dtype=torch.bool, device=keep.device)
    return ~allowed[:, None]


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row of the ``[b, s]`` keep-mask is its tokens, then padding (what the collator makes).

    Then causal attention alone keeps every real token off the padding keys (they all come after it),
    so no ``[b, 1, s, s]`` mask is built and the causal kernels run, which skip the masked half of the
    score blocks (an explicit mask is read for all of them). Only the padding positions' own outputs
    change, and they carry no target. A host mask (``omni_task`` keeps it there) costs no device sync.
    """
    keep = attention_mask.bool()
    return not bool((keep[:, 1:] & ~keep[:, :-1]).any())


def default_position_ids(b: int, s: int, device, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Text-only positions ``[3, b, s]``: 0.. per row, or per packed sequence when ``cu_seqlens`` is given."""
    pos = torch.arange(s, device=device)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device, torch.long)
        pos = pos - torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1], output_size=s)
    return pos.view(1, 1, s).expand(3, b, s)


class TokenLayout:
    """Every token of the ``[b, s]`` rows (or the packed ``[1, s]`` row with ``cu_seqlens``) on this rank."""

    def __init__(self, s: int, b: int, device, cu_seqlens: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None):
        self.s, self.b, self.device = s, b, device
        self.cu_seqlens, self.attention_mask = cu_seqlens, attention_mask

    def input(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's part of the first stage's input ``[s, b, h]``."""
        return hidden

    def attention(self) -> tuple[Optional[torch.Tensor], Optional[PackedSeqParams]]:
        """(megatron mask ``[b, 1, s, s]`` or None for plain causal, packed-sequence parameters or None)."""
        if self.cu_seqlens is not None:
            # a packed row has no padding: cu_seqlens alone say what attends to what (any mask is ignored)
            return None, packed_params(self.cu_seqlens.to(self.device))
        if self.attention_mask is not None and not is_right_padded(self.attention_mask):
            return padding_attention_mask(self.attention_mask.to(self.device)), None
        return None, None

    def positions(self, position_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """M-RoPE positions ``[3, b, s]`` (a ``[b, s]`` tensor on all three axes; None = text positions)."""
        if position_ids is None:
            return default_position_ids(self.b, self.s, self.device, self.cu_seqlens)
        if position_ids.dim() == 2:
            return position_ids[None].expand(3, -1, -1)
        return position_ids

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """The next-token targets of ``labels`` ``[b, s]`` (shifted within each packed sequence)."""
        return shift_labels(labels.to(self.device), self.cu_seqlens)

    def loss(self, per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """The mean token loss of the forward."""
        return mean_loss(per_token_loss, loss_mask)

    def segments(self) -> Optional[torch.Tensor]:
        """``[1, s]``: the packed sequence (index into ``cu_seqlens``) of every position; None unpacked."""
        if self.cu_seqlens is None:
            return None
        cu = self.cu_seqlens.to(self.device, torch.long)
        seg = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=self.device), cu[1:] - cu[:-1],
                                      output_size=self.s)
        return seg[None]
