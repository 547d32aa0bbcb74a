"""The audio encoder's front end: chunk layout, chunk gathering, conv stem, sinusoidal positions.

Qwen2.5-Omni's Whisper-style encoder splits each clip's mel frames into chunks of ``2 * n_window``
frames (the last one shorter), runs the two convolutions per chunk (positions restart at 0 in every
chunk), lets tokens attend only inside their chunk, and finally average-pools pairs of tokens per
clip (across chunk borders). Everything here is index arithmetic on small per-clip / per-chunk
tensors, computed once per forward with a single host sync (the sizes of the outputs), so the hot
path has no Python loop over clips or chunks. With ``feature_lens`` on the host (as the collator makes
them) the layout is built there and moved in one asynchronous copy: no device sync at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams

from mm_omni.models.common.indexing import repeat_counts


def sinusoid_table(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed positions [length, channels]: sin half then cos half (fp32, as transformers)."""
    if channels % 2:
        raise ValueError(f"sinusoidal positions need an even width; got d_model={channels}")
    half = channels // 2
    step = math.log(max_timescale) / (half - 1)
    inv_timescales = torch.exp(-step * torch.arange(half, dtype=torch.float32))
    angles = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x.cumsum(0), (1, 0))[:-1]


@dataclass
class ChunkLayout:
    """Where every chunk and token of a batch of clips lives (all tensors on the input's device).

    ``chunk_*`` have one entry per chunk (clip-major, then time); tokens are the conv outputs kept
    after dropping each chunk's padding, in the same order, so a clip's tokens are contiguous.
    """

    window: int  # mel frames per full chunk (2 * n_window)
    chunk_clip: torch.Tensor  # [C] clip of each chunk
    chunk_start: torch.Tensor  # [C] first mel frame of the chunk inside its clip
    chunk_frames: torch.Tensor  # [C] valid mel frames in the chunk (<= window)
    token_index: torch.Tensor  # [T] flat index of each kept token in the [C, window // 2] conv grid
    cu_seqlens: torch.Tensor  # [C + 1] int32 token boundaries of the chunks (attention segments)
    max_chunk_tokens: int
    pool_index: torch.Tensor  # [P] first token of each averaged pair

    @property
    def num_tokens(self) -> int:
        return self.token_index.numel()

    def to(self, device) -> "ChunkLayout":
        """All index tensors in ONE (pinned, asynchronous) host-to-device copy: no sync in forward."""
        device = torch.device(device)
        tensors = [self.chunk_clip, self.chunk_start, self.chunk_frames, self.token_index, self.cu_seqlens,
                   self.pool_index]
        if tensors[0].device == device or device.type == "cpu":
            return self
        flat = torch.cat([t.reshape(-1).long() for t in tensors]).pin_memory()
        parts = flat.to(device, non_blocking=True).split([t.numel() for t in tensors])
        moved = [part.to(t.dtype) for part, t in zip(parts, tensors)]
        return ChunkLayout(self.window, *moved[:5], self.max_chunk_tokens, moved[5])

    def packed_seq_params(self) -> PackedSeqParams:
        """Attention inside each chunk only: one varlen call for the whole batch."""
        return PackedSeqParams(
            qkv_format="sbhd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
            max_seqlen_q=self.max_chunk_tokens, max_seqlen_kv=self.max_chunk_tokens,
        )


def conv_output_lengths(feature_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens per clip after the stride-2 conv, and after the stride-2 pooling (transformers' rule)."""
    after_cnn = (feature_lens - 1) // 2 + 1
    return after_cnn, (after_cnn - 2) // 2 + 1


def chunk_layout(feature_lens: torch.Tensor, n_window: int) -> ChunkLayout:
    """Chunk / token / pooling indices for clips of ``feature_lens`` mel frames (vectorised).

    A chunk of ``f`` frames yields ``(f - 1) // 2 + 1`` tokens; since full chunks have an even
    number of frames, a clip's token count is ``(L - 1) // 2 + 1`` whatever its split, which is
    what lets every size be known before the per-chunk tensors exist (one host sync in total).
    """
    window = 2 * n_window
    lens = feature_lens.long()
    device = lens.device
    n_chunks = (lens + window - 1) // window
    clip_tokens, pooled = conv_output_lengths(lens)
    first_chunk_tokens = clip_tokens.clamp(max=window // 2)
    sizes = torch.stack([n_chunks.sum(), clip_tokens.sum(), pooled.sum(), first_chunk_tokens.max(),
                         (lens <= 0).sum()])
    num_chunks, num_tokens, num_pooled, max_chunk_tokens, empty = sizes.tolist()  # the one host sync
    if empty:
        raise ValueError(f"every audio clip needs at least one mel frame; got feature_lens={lens.tolist()}")

    clips = torch.arange(lens.numel(), device=device)
    chunk_clip = repeat_counts(clips, n_chunks, num_chunks)
    chunk_rank = torch.arange(num_chunks, device=device) - _exclusive_cumsum(n_chunks)[chunk_clip]
    chunk_start = chunk_rank * window
    chunk_frames = (lens[chunk_clip] - chunk_start).clamp(max=window)
    chunk_tokens = (chunk_frames - 1) // 2 + 1
    cu_seqlens = F.pad(chunk_tokens.cumsum(0), (1, 0)).to(torch.int32)

    # token t of chunk c sits at c * (window // 2) + (t - cu_seqlens[c]) in the padded conv grid
    token_chunk = repeat_counts(torch.arange(num_chunks, device=device), chunk_tokens, num_tokens)
    token_pos = torch.arange(num_tokens, device=device) - cu_seqlens[:-1].long()[token_chunk]
    token_index = token_chunk * (window // 2) + token_pos

    # pair k of clip i averages its tokens 2k and 2k + 1 (pairs never straddle two clips)
    pool_clip = repeat_counts(clips, pooled, num_pooled)
    pair = torch.arange(num_pooled, device=device) - _exclusive_cumsum(pooled)[pool_clip]
    pool_index = _exclusive_cumsum(clip_tokens)[pool_clip] + 2 * pair
    return ChunkLayout(window, chunk_clip, chunk_start, chunk_frames, token_index, cu_seqlens,
                       max_chunk_tokens, pool_index)


def gather_chunks(input_features: torch.Tensor, feature_lens: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """[C, mel, window] chunks, zero past each chunk's valid frames.

    ``input_features`` is either padded per clip, ``[n_audio, mel, T_max]``, or transformers' flat
    layout of the valid frames of all clips, ``[mel, sum(feature_lens)]``.
    """
    offsets = torch.arange(layout.window, device=input_features.device)
    frame = layout.chunk_start[:, None] + offsets  # [C, window], frame inside the clip
    valid = offsets < layout.chunk_frames[:, None]
    if input_features.dim() == 3:
        frames = input_features.transpose(1, 2)  # [n, T, mel]
        chunks = frames[layout.chunk_clip[:, None], frame.clamp(max=frames.shape[1] - 1)]
    elif input_features.dim() == 2:
        flat = input_features.t()  # [N, mel]
        start = _exclusive_cumsum(feature_lens.long())[layout.chunk_clip]
        chunks = flat[(start[:, None] + frame).clamp(max=flat.shape[0] - 1)]
    else:
        raise ValueError("input_features must be [n_audio, mel, T] or [mel, frames]; "
                         f"got {tuple(input_features.shape)}")
    # clamped (out-of-clip) reads are zeroed: a chunk must see zeros past its end, as in transformers
    return (chunks * valid[..., None]).transpose(1, 2)


def conv_stem(conv1, conv2, chunks: torch.Tensor, layout: ChunkLayout, positions: torch.Tensor) -> torch.Tensor:
    """conv1 -> GELU -> conv2 (stride 2) -> GELU -> + positions, keeping the valid tokens: [T, d_model]."""
    chunks = chunks.to(conv1.weight.dtype)
    valid = torch.arange(chunks.shape[-1], device=chunks.device) < layout.chunk_frames[:, None]
    # padding frames must be zero going into conv2 (not GELU(bias)), as in transformers
    hidden = F.gelu(conv1(chunks)) * valid[:, None, :].to(chunks.dtype)
    hidden = F.gelu(conv2(hidden)).transpose(1, 2)  # [C, window // 2, d]
    hidden = hidden + positions[: hidden.shape[1]].to(hidden.dtype)
    return hidden.reshape(-1, hidden.shape[-1])[layout.token_index]
