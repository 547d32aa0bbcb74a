"""Collation: pad rows into ``[b, s]`` or pack them into one ``[1, s]`` sequence with ``cu_seqlens``.

Batch keys (what the model consumes): ``input_ids``, ``labels`` (-100 = ignored, not shifted),
``attention_mask``, ``position_ids [3, b, s]``, ``pixel_values``, ``image_grid_thw``,
``pixel_values_videos``, ``video_grid_thw``, ``video_second_per_grid``, ``input_features``
``[n_audio, 128, T]`` (T = longest valid audio of the batch, not 30 s), ``feature_attention_mask``,
``use_audio_in_video`` (one bool per row) and, when packing, ``cu_seqlens`` (int32, n_rows + 1).
Media tensors are concatenated in row order, which is the order of their tokens in the flattened
batch. Modalities absent from the batch are absent from the dict.
"""

from __future__ import annotations

from typing import Any

import torch

from mm_omni.data.template import IGNORE_INDEX

_CAT_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid")
PAD_POSITION = 1  # what transformers' get_rope_index leaves on padding


class OmniCollator:
    def __init__(self, pad_token_id: int, packing: bool = False, pad_to_multiple_of: int = 8):
        self.pad_token_id = pad_token_id
        self.packing = packing
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self._pack(rows) if self.packing else self._pad(rows)
        batch.update(_media(rows))
        batch["use_audio_in_video"] = torch.tensor([bool(r["use_audio_in_video"]) for r in rows])
        return batch

    def _pad(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        m = self.pad_to_multiple_of
        s = -(-longest // m) * m
        b = len(rows)
        input_ids = torch.full((b, s), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, s), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((b, s), dtype=torch.long)
        position_ids = torch.full((3, b, s), PAD_POSITION, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            input_ids[i, :n] = r["input_ids"]
            labels[i, :n] = r["labels"]
            attention_mask[i, :n] = 1
            position_ids[:, i, :n] = r["position_ids"]
        return dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask, position_ids=position_ids)

    def _pack(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([len(r["input_ids"]) for r in rows], dtype=torch.int32)
        cu = torch.zeros(len(rows) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lengths, 0)
        labels = []
        for r in rows:
            lab = r["labels"].clone().long()
            # The model shifts labels by one; a row's first label would be predicted from the previous
            # row's last token. Unpacked, labels[0] is never a target either, so this changes nothing.
            lab[0] = IGNORE_INDEX
            labels.append(lab)
        input_ids = torch.cat([r["input_ids"].long() for r in rows])[None]
        return dict(
            input_ids=input_ids,
            labels=torch.cat(labels)[None],
            attention_mask=torch.ones_like(input_ids),
            position_ids=torch.cat([r["position_ids"] for r in rows], dim=1)[:, None, :],
            cu_seqlens=cu,
        )


def _media(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key in _CAT_KEYS:
        parts = [r[key] for r in rows if key in r]
        if parts:
            out[key] = torch.cat([torch.as_tensor(p) for p in parts])
    feats = [r for r in rows if "input_features" in r]
    if feats:
        t = max(r["input_features"].shape[-1] for r in feats)
        n = sum(r["input_features"].shape[0] for r in feats)
        mel = feats[0]["input_features"].shape[1]
        features = torch.zeros((n, mel, t), dtype=feats[0]["input_features"].dtype)
        mask = torch.zeros((n, t), dtype=torch.long)
        k = 0
        for r in feats:
            a, l = r["input_features"].shape[0], r["input_features"].shape[-1]
            features[k:k + a, :, :l] = r["input_features"]
            mask[k:k + a, :l] = r["feature_attention_mask"]
            k += a
        out["input_features"] = features
        out["feature_attention_mask"] = mask
    return out
