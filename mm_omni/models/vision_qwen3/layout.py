"""Per-patch bookkeeping of the Qwen3-VL-style vision encoder: 2D positions, learned-position taps, frames.

The processor emits each frame's patches in *merge-block* order (the ``m x m`` patches fused into one LLM
token are adjacent; ``m = spatial_merge_size``), and the encoder keeps that order throughout: there is no
window attention, every layer attends within a frame (a video of ``t`` temporal patches is ``t``
segments, as in transformers).

Learned positions: a square table of ``side x side`` entries (``side = int(sqrt(num_position_embeddings))``)
is resampled to each frame's ``h x w`` patch grid by bilinear interpolation with aligned corners: patch
row ``r`` samples the table at ``r * (side - 1) / max(h - 1, 1)``, the two neighbouring rows (clamped to the
table) weighted by the distance, likewise for columns; the four taps of a patch are the products. This is
what transformers' ``get_vision_interpolation_indices_and_weights(mode="bilinear", align_corners=True)``
computes, in the same floating-point operations.

Everything is built on the CPU from ``grid_thw`` with tensor ops over all patches at once, then moved in
one copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams

from mm_omni.models.common.indexing import repeat_counts


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x.cumsum(0), (1, 0))[:-1]


@dataclass
class Qwen3VisionLayout:
    pos_hw: torch.Tensor  # [n_patches, 2] (row, col) of each patch in its frame, input order
    interp_index: torch.Tensor  # [n_patches, 4] rows of the learned table each patch mixes
    interp_weight: torch.Tensor  # [n_patches, 4] fp32 bilinear weights of those rows
    cu_seqlens: torch.Tensor  # [n_frames + 1] int32 patch boundaries of the frames (attention segments)
    max_seqlen: int

    @property
    def num_patches(self) -> int:
        return self.pos_hw.shape[0]

    def to(self, device) -> "Qwen3VisionLayout":
        """The index tensors in one (pinned, asynchronous) host-to-device copy, the weights in another."""
        device = torch.device(device)
        if device.type == "cpu":
            return self
        ints = [self.pos_hw, self.interp_index, self.cu_seqlens]
        flat = torch.cat([t.reshape(-1).long() for t in ints]).pin_memory().to(device, non_blocking=True)
        moved = [part.view(t.shape).to(t.dtype) for part, t in zip(flat.split([t.numel() for t in ints]), ints)]
        weight = self.interp_weight.pin_memory().to(device, non_blocking=True)
        return Qwen3VisionLayout(moved[0], moved[1], weight, moved[2], self.max_seqlen)

    def packed_seq_params(self) -> PackedSeqParams:
        """Attention inside each frame: one varlen call for the whole batch."""
        return frame_params(self.cu_seqlens, self.max_seqlen)


def frame_params(cu_seqlens: torch.Tensor, max_seqlen: int) -> PackedSeqParams:
    """Attention inside each frame of ``cu_seqlens`` (the longest ``max_seqlen`` patches)."""
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)


def _bilinear_taps(index: torch.Tensor, size: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two taps into a ``side``-long axis and their weights for target position ``index`` of ``size``."""
    src = index.to(torch.float32) * (side - 1) / torch.clamp(size - 1, min=1)  # aligned corners
    floor = torch.floor(src)
    offsets = torch.arange(2)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


def qwen3_vision_layout(grid_thw: torch.Tensor, spatial_merge_size: int, num_position_embeddings: int
                        ) -> Qwen3VisionLayout:
    """The :class:`Qwen3VisionLayout` of ``grid_thw`` [n_media, 3] (t, h, w in patches), on the CPU."""
    m = spatial_merge_size
    side = int(num_position_embeddings ** 0.5)  # transformers' num_grid_per_side
    grid = grid_thw.detach().to("cpu", torch.long).reshape(-1, 3)
    if grid.numel() and ((grid[:, 1:] % m) != 0).any():
        raise ValueError(f"grid_thw heights and widths must be multiples of spatial_merge_size={m}; "
                         f"got {grid.tolist()}")

    # one row per frame (temporal patch), then one per patch: its frame's size and its place in the frame
    frame_h = repeat_counts(grid[:, 1], grid[:, 0])
    frame_w = repeat_counts(grid[:, 2], grid[:, 0])
    frame_len = frame_h * frame_w
    frame = repeat_counts(torch.arange(frame_len.numel()), frame_len)
    local = torch.arange(frame.numel()) - _exclusive_cumsum(frame_len)[frame]
    h, w = frame_h[frame], frame_w[frame]

    # merge-block order: (block row, block column, row in the block, column in the block)
    block, inner = local // (m * m), local % (m * m)
    blocks_w = w // m
    row = (block // blocks_w) * m + inner // m
    col = (block % blocks_w) * m + inner % m

    row_taps, row_weights = _bilinear_taps(row, h, side)
    col_taps, col_weights = _bilinear_taps(col, w, side)
    interp_index = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)
    interp_weight = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)

    cu_seqlens = F.pad(frame_len.cumsum(0), (1, 0)).to(torch.int32)
    max_seqlen = int(frame_len.max()) if frame_len.numel() else 0
    return Qwen3VisionLayout(torch.stack([row, col], dim=-1), interp_index, interp_weight, cu_seqlens, max_seqlen)
