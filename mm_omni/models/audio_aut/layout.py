"""Token bookkeeping of the AuT encoder: chunks, kept tokens, attention windows.

As in transformers' ``Qwen3OmniMoeAudioEncoder``: every clip's mel frames are cut into chunks of
``2 * n_window`` frames (the last one shorter; :func:`mm_omni.models.audio.front_end.chunk_layout`), all
chunks of the batch are zero-padded to the longest one and go through the convolutions together, and a
chunk keeps ``aut_output_lengths(frames)`` of its conv outputs, whose positions restart at 0. Note that
the convolutions see the padding: a chunk shorter than the batch's longest one reads, at its edge, conv
outputs of padding frames (bias included), so a short clip's last tokens depend on the batch's longest
chunk, exactly as in transformers (a batch with any clip of a full chunk or longer always pads to a full
chunk). The kept tokens of a clip are contiguous; attention runs inside windows of
``chunk_tokens * (n_window_infer // (2 * n_window))`` tokens per clip (the last one shorter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams

from mm_omni.models.audio.front_end import ChunkLayout, chunk_layout
from mm_omni.models.audio_aut.config import FULL_CHUNK_TOKENS
from mm_omni.models.common.indexing import repeat_counts


def aut_output_lengths(lens: torch.Tensor, n_window: int = 50) -> torch.Tensor:
    """Tokens of clips of ``lens`` mel frames: transformers' ``_get_feat_extract_output_lengths``, the three
    stride-2 convolutions on the frames past the last full chunk plus 13 per full chunk."""
    chunk = 2 * n_window
    rest = (lens % chunk - 1) // 2 + 1
    return ((rest - 1) // 2 + 1 - 1) // 2 + 1 + (lens // chunk) * FULL_CHUNK_TOKENS


@dataclass
class AuTLayout:
    chunks: ChunkLayout  # chunk_clip, chunk_start, chunk_frames (the rest of it is the Whisper stack's)
    width: int  # mel frames of the longest chunk: the padded convolution input
    grid: int  # conv outputs per padded chunk
    token_index: torch.Tensor  # [T] kept tokens in the flat [C, grid] conv output
    cu_seqlens: torch.Tensor  # [W + 1] int32 token boundaries of the attention windows
    max_window: int

    @property
    def num_tokens(self) -> int:
        return self.token_index.numel()

    def to(self, device) -> "AuTLayout":
        device = torch.device(device)
        if device.type == "cpu":
            return self
        moved = [t.pin_memory().to(device, non_blocking=True) for t in (self.token_index, self.cu_seqlens)]
        return AuTLayout(self.chunks.to(device), self.width, self.grid, *moved, self.max_window)


def window_params(cu_seqlens: torch.Tensor, max_window: int) -> PackedSeqParams:
    """Attention inside each window of ``cu_seqlens`` (the longest ``max_window`` tokens)."""
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=max_window, max_seqlen_kv=max_window)


def aut_layout(feature_lens: torch.Tensor, n_window: int, n_window_infer: int) -> AuTLayout:
    """The :class:`AuTLayout` of clips of ``feature_lens`` mel frames, built on the CPU."""
    lens = feature_lens.detach().to("cpu", torch.long).reshape(-1)
    chunks = chunk_layout(lens, n_window)  # refuses empty clips
    chunk_tokens = aut_output_lengths(chunks.chunk_frames, n_window)
    width = int(chunks.chunk_frames.max())
    grid = int(chunk_tokens.max())  # = the convolutions' output length of `width` frames (n_window is checked)

    # token t of chunk c sits at c * grid + t; chunks are clip-major, so a clip's tokens are contiguous
    chunk = repeat_counts(torch.arange(chunk_tokens.numel()), chunk_tokens)
    first = F.pad(chunk_tokens.cumsum(0), (1, 0))[:-1]
    token_index = chunk * grid + torch.arange(chunk.numel()) - first[chunk]

    # attention windows of `window` tokens per clip, the last one shorter
    window = grid * (n_window_infer // (2 * n_window))
    clip_tokens = aut_output_lengths(lens, n_window)
    n_windows = (clip_tokens + window - 1) // window
    window_clip = repeat_counts(torch.arange(lens.numel()), n_windows)
    rank = torch.arange(window_clip.numel()) - F.pad(n_windows.cumsum(0), (1, 0))[:-1][window_clip]
    window_tokens = (clip_tokens[window_clip] - rank * window).clamp(max=window)
    cu_seqlens = F.pad(window_tokens.cumsum(0), (1, 0)).to(torch.int32)
    return AuTLayout(chunks, width, grid, token_index, cu_seqlens, int(window_tokens.max()))
