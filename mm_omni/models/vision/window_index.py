"""Token bookkeeping of the Qwen2.5-VL vision encoder: window order, 2D positions, segments.

The processor emits the patches of each frame in *merge-block* order: the ``m x m`` patches
(``m = spatial_merge_size``) that the projector later fuses into one LLM token are adjacent.
Window attention needs the merged tokens of each window adjacent too, so the encoder reorders
whole merge blocks into window order (frame, window row, window column, row, column inside the
window) before the first layer and restores the original order after the projector. Windows
are ``window_size // m // patch_size`` merged tokens on a side; windows at the right and bottom
edges are cut short; no window crosses a frame.

Two segmentations drive the attention (both in window order, in patches):
* ``cu_window_seqlens``: one segment per window (window-attention layers);
* ``cu_seqlens``: one segment per frame (the ``fullatt_block_indexes`` layers). A video of
  ``t`` temporal patches is ``t`` segments, not one: transformers' Qwen2.5-VL / Omni attend
  within a frame only (``repeat_interleave(h * w, t)``), and so do we. Frames stay contiguous
  after the window reordering because windows never cross frames.

Everything is computed with tensor ops over all merged tokens of the batch at once (no loop over
images or windows), on the CPU: ``grid_thw`` is a handful of integers and the results are needed
on the host anyway (``max_seqlen``), so one host-to-device copy per tensor replaces dozens of tiny
kernels and syncs on the accelerator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams

from mm_omni.models.common.attention import LayerwisePackedSeqParams
from mm_omni.models.common.indexing import repeat_counts


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x.cumsum(0), (1, 0))[:-1]


def _ceil_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return (a + b - 1) // b


@dataclass
class VisionLayout:
    """Indices and segment boundaries of one batch of images / videos (see module docstring)."""

    window_index: torch.Tensor  # [n_merged] original merged-token id at each window-order slot
    reverse_index: torch.Tensor  # [n_merged] window-order slot of each original merged token
    pos_hw: torch.Tensor  # [n_patches, 2] (row, col) of each patch, window order
    cu_window_seqlens: torch.Tensor  # [n_windows + 1] int32, patches
    cu_seqlens: torch.Tensor  # [n_frames + 1] int32, patches
    max_window_seqlen: int
    max_seqlen: int

    @property
    def num_patches(self) -> int:
        return self.pos_hw.shape[0]

    def to(self, device) -> "VisionLayout":
        """All index tensors in ONE (pinned, asynchronous) host-to-device copy: no sync in forward."""
        device = torch.device(device)
        tensors = [self.window_index, self.reverse_index, self.pos_hw, self.cu_window_seqlens, self.cu_seqlens]
        if device.type == "cpu":
            return self
        flat = torch.cat([t.reshape(-1).to(torch.int32) for t in tensors]).pin_memory()
        parts = flat.to(device, non_blocking=True).split([t.numel() for t in tensors])
        moved = [part.view(t.shape) for part, t in zip(parts, tensors)]
        return VisionLayout(*moved, self.max_window_seqlen, self.max_seqlen)

    def packed_seq_params(self, fullatt_block_indexes) -> LayerwisePackedSeqParams:
        """Window segments for every layer except ``fullatt_block_indexes`` (global, 0-based)."""
        full = _packed(self.cu_seqlens, self.max_seqlen)
        return LayerwisePackedSeqParams(
            **vars(_packed(self.cu_window_seqlens, self.max_window_seqlen)),
            per_layer={int(i): full for i in fullatt_block_indexes},
        )


def _packed(cu: torch.Tensor, max_len: int) -> PackedSeqParams:
    # max_len comes from the host-side build: reading it from a device tensor would sync
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len,
                           max_seqlen_kv=max_len)


def _max_len(cu: torch.Tensor) -> int:
    return int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0


def vision_layout(grid_thw: torch.Tensor, spatial_merge_size: int, window_size: int, patch_size: int) -> VisionLayout:
    """Build the :class:`VisionLayout` of ``grid_thw`` [n_media, 3] (t, h, w in patches).

    ``window_size`` is in pixels (``window_attn_size`` of model.json, transformers' ``window_size``).
    The result lives on the CPU; :meth:`VisionLayout.to` moves it.
    """
    m = spatial_merge_size
    side = window_size // m // patch_size  # window side, in merged tokens
    if side < 1:
        raise ValueError(
            f"window_attn_size={window_size} is smaller than one merged token "
            f"(spatial_merge_size * patch_size = {m * patch_size} pixels); raise it to at least that"
        )
    grid = grid_thw.detach().to("cpu", torch.long).reshape(-1, 3)
    if grid.numel() and ((grid[:, 1:] % m) != 0).any():
        raise ValueError(f"grid_thw heights and widths must be multiples of spatial_merge_size={m}; got {grid.tolist()}")

    # one row per frame (temporal patch): its merged-token grid and its window grid
    frame_h = repeat_counts(grid[:, 1] // m, grid[:, 0])
    frame_w = repeat_counts(grid[:, 2] // m, grid[:, 0])
    frame_tokens = frame_h * frame_w
    windows_w = _ceil_div(frame_w, side)
    frame_windows = _ceil_div(frame_h, side) * windows_w

    # one row per merged token, in the input order: its frame, row and column
    n_frames = frame_tokens.numel()
    frame = repeat_counts(torch.arange(n_frames), frame_tokens)
    local = torch.arange(frame.numel()) - _exclusive_cumsum(frame_tokens)[frame]
    width = frame_w[frame]
    row, col = local // width, local % width

    # global window id, then a key that sorts by (window, row, column in the window)
    window = _exclusive_cumsum(frame_windows)[frame] + (row // side) * windows_w[frame] + col // side
    key = (window * side + row % side) * side + col % side
    window_index = torch.argsort(key)  # keys are unique: no ties to break
    reverse_index = torch.empty_like(window_index)
    reverse_index[window_index] = torch.arange(window_index.numel())

    # every window of the ceil-divided grid holds at least one token: no empty segments
    window_tokens = torch.bincount(window, minlength=int(frame_windows.sum()))
    unit = m * m
    cu_window_seqlens = F.pad(window_tokens.cumsum(0) * unit, (1, 0)).to(torch.int32)
    cu_seqlens = F.pad(frame_tokens.cumsum(0) * unit, (1, 0)).to(torch.int32)

    # patch positions in window order: merged token (r, c) covers rows r*m .. r*m+m-1, same for columns
    inner = torch.arange(unit)
    rows = row[window_index, None] * m + inner // m
    cols = col[window_index, None] * m + inner % m
    pos_hw = torch.stack([rows, cols], dim=-1).reshape(-1, 2)
    return VisionLayout(window_index, reverse_index, pos_hw, cu_window_seqlens, cu_seqlens,
                        _max_len(cu_window_seqlens), _max_len(cu_seqlens))
