"""Collation: pad rows into ``[b, s]`` or pack them into one ``[1, s]`` sequence with ``cu_seqlens``.

Token keys: ``input_ids``, ``labels`` (-100 = ignored, not shifted), ``attention_mask``, ``position_ids``
``[3, b, s]`` (int64, or the rows' float dtype where a template gives fractional positions) and, when
packing, ``cu_seqlens`` (int32, one entry per sequence + 1: the rows, then the bucket padding's sequence if
there is one; see :class:`OmniCollator`). Every other key of a row is what the
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

from typing import Any, Optional, Sequence

import torch

from mm_omni.data.template import IGNORE_INDEX

TOKEN_KEYS = ("input_ids", "labels", "position_ids")  # what _pad / _pack lay out
PAD_POSITION = 1  # what transformers' get_rope_index leaves on padding


class OmniCollator:
    """``packing``: lay the rows out as one sequence (else pad them to ``[b, s]``).

    When packing, ``segment_multiple`` pads every row to a multiple of it inside its own sequence
    (what context / sequence parallelism needs, so their per-sequence padding finds nothing left to
    do), and ``bucket_lengths`` (sorted) pads the sequence up to the smallest bucket that holds it,
    the padding being one more sequence of its own at the end: the decoder then sees a few repeating
    shapes. Padding tokens are ``pad_token_id`` with label ``IGNORE_INDEX``, ``attention_mask`` 0 and
    position ``PAD_POSITION``; each sits after the real tokens of its own sequence, so no real token
    attends to it and the loss is unchanged.
    """

    def __init__(self, pad_token_id: int, packing: bool = False, pad_to_multiple_of: int = 8,
                 bucket_lengths: Optional[Sequence[int]] = None, segment_multiple: int = 1):
        self.pad_token_id = pad_token_id
        self.packing = packing
        self.pad_to_multiple_of = pad_to_multiple_of
        self.bucket_lengths = tuple(sorted(bucket_lengths)) if bucket_lengths else None
        self.segment_multiple = segment_multiple

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self._pack(rows) if self.packing else self._pad(rows)
        batch.update(_row_values(rows))
        return batch

    def _pad(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pos_dtype = _position_dtype(rows)
        longest = max(len(r["input_ids"]) for r in rows)
        m = self.pad_to_multiple_of
        s = -(-longest // m) * m
        b = len(rows)
        input_ids = torch.full((b, s), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, s), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((b, s), dtype=torch.long)
        position_ids = torch.full((3, b, s), PAD_POSITION, dtype=pos_dtype)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            input_ids[i, :n] = r["input_ids"]
            labels[i, :n] = r["labels"]
            attention_mask[i, :n] = 1
            position_ids[:, i, :n] = r["position_ids"]
        return dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask, position_ids=position_ids)

    def _pack(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pos_dtype = _position_dtype(rows)
        ids, labels, mask, pos, lengths = [], [], [], [], []
        for r in rows:
            n = len(r["input_ids"])
            lab = r["labels"].clone().long()
            # The model shifts labels by one; a row's first label would be predicted from the previous
            # row's last token. Unpacked, labels[0] is never a target either, so this changes nothing.
            lab[0] = IGNORE_INDEX
            self._append(ids, labels, mask, pos, r["input_ids"].long(), lab, r["position_ids"].to(pos_dtype),
                         -n % self.segment_multiple)
            lengths.append(n + -n % self.segment_multiple)
        total = sum(lengths)
        if self.bucket_lengths is not None:
            bucket = next((b for b in self.bucket_lengths if b >= total), None)
            if bucket is None:
                raise ValueError(f"a packed micro-batch of {total} tokens is longer than the largest bucket "
                                 f"{self.bucket_lengths[-1]}: the sampler's packs exceed its budget")
            if bucket > total:  # the padding: a sequence of its own
                empty = torch.zeros(0, dtype=torch.long)
                self._append(ids, labels, mask, pos, empty, empty, torch.zeros(3, 0, dtype=pos_dtype), bucket - total)
                lengths.append(bucket - total)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
        return dict(
            input_ids=torch.cat(ids)[None],
            labels=torch.cat(labels)[None],
            attention_mask=torch.cat(mask)[None],
            position_ids=torch.cat(pos, dim=1)[:, None, :],
            cu_seqlens=cu,
        )

    def _append(self, ids: list, labels: list, mask: list, pos: list, row_ids: torch.Tensor,
                row_labels: torch.Tensor, row_pos: torch.Tensor, pad: int) -> None:
        """One sequence of the packed row: the tokens, then ``pad`` padding tokens."""
        ids += [row_ids, torch.full((pad,), self.pad_token_id, dtype=torch.long)]
        labels += [row_labels, torch.full((pad,), IGNORE_INDEX, dtype=torch.long)]
        mask += [torch.ones(len(row_ids), dtype=torch.long), torch.zeros(pad, dtype=torch.long)]
        pos += [row_pos, torch.full((3, pad), PAD_POSITION, dtype=row_pos.dtype)]


def _position_dtype(rows: list[dict[str, Any]]) -> torch.dtype:
    """int64, or the rows' float dtype when their positions are fractional (never rounded to integers)."""
    floats = [r["position_ids"].dtype for r in rows if r["position_ids"].is_floating_point()]
    return floats[0] if floats else torch.long


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
