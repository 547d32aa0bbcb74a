"""What code that spreads a media encoder over ranks may know of it: the encoder's input is a batch of items.

An encoder that implements :class:`ItemEncoder` is called as ``encoder(data, sizes)``: ``data`` holds the
media of every item of the batch (one floating tensor, in item order; the caller casts it to the
encoder's dtype), ``sizes`` describes each item (one entry per item, kept on the host) and the output
holds every item's tokens, concatenated in item order. The methods below tell the rest without the
caller knowing what an item is: what it costs, how many tokens it yields, how to keep some items of a
batch, how to put the items of several batches into one call, and a tiny input for a forward whose
only purpose is to give every parameter a gradient. The vision encoder's items are images / videos
(rows of patches by ``grid_thw``), the audio encoder's are clips (mel frames by their lengths).
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class ItemEncoder(Protocol):
    def item_costs(self, sizes: torch.Tensor) -> list[int]:
        """The work of each item (what the encoder's compute grows with), for balancing items over ranks."""

    def item_tokens(self, sizes: torch.Tensor) -> list[int]:
        """Output rows of each item."""

    def take_items(self, data: torch.Tensor, sizes: torch.Tensor,
                   items: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(data, sizes)`` of the items ``items`` (indices into the batch, in that order) alone."""

    def join_items(self, parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One ``(data, sizes)`` of several batches' items, in order (one encoder call for all of them)."""

    def dummy_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A one-item input of zeros, on the encoder's device and in its dtype."""


def dummy_forward(encoder: ItemEncoder) -> torch.Tensor:
    """The encoder's output on its dummy input: multiplied by zero into a result, it gives every parameter a
    (zero) gradient, so data-parallel gradient reduction sees the same parameters on every rank."""
    return encoder(*encoder.dummy_inputs())


def item_starts(counts: Sequence[int]) -> list[int]:
    """Offsets of consecutive items of these lengths (and the end): ``[0, c0, c0 + c1, ...]``."""
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    return starts
