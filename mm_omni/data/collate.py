"""Collation: pad rows into ``[b, s]`` or pack them into one ``[1, s]`` sequence with ``cu_seqlens``.

Token keys: ``input_ids``, ``labels`` (-100 = ignored, not shifted), ``attention_mask``, ``position_ids``
``[3, b, s]`` and, when packing, ``cu_seqlens`` (int32, n_rows + 1). Every other key of a row is what the
row encoder put there for the model, collated by one rule per kind of value, not by name:

- a tensor (media: pixels, grids, mel features and their masks, ...) is concatenated along its first
  dimension in row order, which is the order of the media tokens in the flattened batch; where the
  rows' trailing sizes differ (each row's audio features are cut to its own longest clip) they are
  zero-padded to the batch's largest first; integer tensors (sizes, masks) come out as int64. A key
  absent from every row is absent from the batch;
- a Python scalar (a per-row flag such as ``use_audio_in_video``) becomes one entry per row, and must
  be on every row.

Rows of images, videos and audio thus give ``pixel_values``, ``image_grid_thw``, ``pixel_values_videos``,
``video_grid_thw``, ``video_second_per_grid``, ``input_features`` ``[n_audio, 128, T]`` (T = longest
valid audio of the batch, not 30 s), ``feature_attention_mask`` and ``use_audio_in_video``.
"""

from __future__ import annotations

from typing import Any

import torch

from mm_omni.data.template import IGNORE_INDEX

TOKEN_KEYS = ("input_ids", "labels", "position_ids")  # what _pad / _pack lay out
PAD_POSITION = 1  # what transformers' get_rope_index leaves on padding


class OmniCollator:
    def __init__(self, pad_token_id: int, packing: bool = False, pad_to_multiple_of: int = 8):
        self.pad_token_id = pad_token_id
        self.packing = packing
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self._pack(rows) if self.packing else self._pad(rows)
        batch.update(_row_values(rows))
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


def _row_values(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Every non-token key of the rows, by the rules of the module docstring (keys in order of appearance)."""
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in TOKEN_KEYS))
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        values = [r[key] for r in rows if key in r]
        if isinstance(values[0], (bool, int, float)):
            if len(values) != len(rows):
                raise ValueError(f"collate: {key} is on {len(values)} of {len(rows)} rows; a per-row value "
                                 "must be on every row")
            out[key] = torch.tensor(values)
        else:
            out[key] = _concat_padded([torch.as_tensor(v) for v in values])
    return out


def _concat_padded(parts: list[torch.Tensor]) -> torch.Tensor:
    """``parts`` along dim 0, each zero-padded at the end of its trailing dims to the largest; int64 if integer."""
    shape = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
    dtype = torch.long if not parts[0].is_floating_point() and parts[0].dtype != torch.bool else parts[0].dtype
    if all(list(p.shape[1:]) == shape for p in parts):
        return torch.cat(parts).to(dtype)
    out = torch.zeros((sum(p.shape[0] for p in parts), *shape), dtype=dtype)
    k = 0
    for p in parts:
        out[(slice(k, k + p.shape[0]), *(slice(0, n) for n in p.shape[1:]))] = p
        k += p.shape[0]
    return out
