"""The items of a mel-spectrogram audio encoder (:class:`mm_omni.models.common.encoder_api.ItemEncoder`).

An item is a clip: it costs its valid mel frames (``feature_lens``) and comes either padded per clip,
``[n_audio, mel, T_max]``, or as transformers' flat valid frames ``[mel, sum(feature_lens)]``. How many
tokens a clip yields is the encoder's own rule (``item_tokens``), as is its dummy input.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mm_omni.models.common.encoder_api import item_starts


class ClipItems:
    def item_costs(self, feature_lens: torch.Tensor) -> list[int]:
        """Valid mel frames per clip."""
        return feature_lens.tolist()

    def take_items(self, input_features: torch.Tensor, feature_lens: torch.Tensor,
                   items: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor(items)
        lens = feature_lens[idx.to(feature_lens.device)]
        if input_features.dim() == 3:  # padded [n_audio, mel, T]
            return input_features.index_select(0, idx.to(input_features.device)), lens
        starts = item_starts(self.item_costs(feature_lens))  # transformers' flat valid frames [mel, sum(lens)]
        cols = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in items])
        return input_features.index_select(1, cols.to(input_features.device)), lens

    def join_items(self, parts) -> tuple[torch.Tensor, torch.Tensor]:
        """Every clip's valid frames in the flat layout ``[mel, sum(lens)]`` (padded parts differ in length)."""
        flat = []
        for feats, lens in parts:
            if feats.dim() == 3:  # padded [n, mel, T] -> transformers' flat [mel, sum(T_i)]
                feats = torch.cat([clip[:, :n] for clip, n in zip(feats, lens.tolist())], dim=1)
            flat.append(feats)
        return torch.cat(flat, dim=1), torch.cat([lens for _, lens in parts])
