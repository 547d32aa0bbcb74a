"""The items of a patch-based vision encoder (:class:`mm_omni.models.common.encoder_api.ItemEncoder`).

An item is an image or a video: its patches are its ``t * h * w`` rows of ``pixel_values`` (its
``grid_thw`` row) and it yields one token per merge block of ``spatial_merge_size ** 2`` patches. Shared by
every encoder whose ``encoder`` has a ``cfg`` (``spatial_merge_size``, ``in_channels``,
``temporal_patch_size``, ``patch_size``) and a ``patch_embed.proj`` weight.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mm_omni.models.common.encoder_api import item_starts


class PatchItems:
    def item_costs(self, grid_thw: torch.Tensor) -> list[int]:
        """Patches per image / video (``t * h * w``)."""
        return grid_thw.prod(-1).tolist()

    def item_tokens(self, grid_thw: torch.Tensor) -> list[int]:
        """One token per merge block of ``spatial_merge_size ** 2`` patches."""
        return [p // self.encoder.cfg.spatial_merge_size**2 for p in self.item_costs(grid_thw)]

    def take_items(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                   items: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        starts = item_starts(self.item_costs(grid_thw))
        rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in items]).to(pixel_values.device)
        return pixel_values.index_select(0, rows), grid_thw[torch.tensor(items)]

    def join_items(self, parts) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([px for px, _ in parts]), torch.cat([grid for _, grid in parts])

    def dummy_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One image of a single merge block (``spatial_merge_size ** 2`` patches) of zeros."""
        vc = self.encoder.cfg
        m = vc.spatial_merge_size
        width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        weight = self.encoder.patch_embed.proj.weight
        return torch.zeros(m * m, width, dtype=weight.dtype, device=weight.device), torch.tensor([[1, m, m]])
