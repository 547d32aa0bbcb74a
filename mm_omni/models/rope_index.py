"""3D position ids (M-RoPE) of one Qwen2.5-Omni sequence, equal to transformers' ``get_rope_index``.

Rules (per row, left to right; "next" = max of the previously emitted block + 1, as transformers
does — note it is the max of the *last* block, not of everything so far):

* text token: next, on all three axes;
* image / plain video span ``<bos> V... <eos>``: bos = next; vision tokens = base + (t, h, w) with
  base = bos + 1, t = frame-group index * seconds-per-group * position_id_per_seconds (truncated),
  h/w = merged patch row/column; eos = next;
* audio span ``<bos> A... <eos>``: bos, then ``n`` consecutive positions, then eos;
* audio-in-video ``<vision_bos><audio_bos> ... <audio_eos><vision_eos>``: both bos share one
  position; video and audio positions share one base and are emitted in alternating time chunks of
  ``position_id_per_seconds * seconds_per_chunk`` ticks (the same chunking the processor used to lay
  out the tokens); both eos share ``next`` of the last chunk.

Runs in data workers (numpy / torch CPU), one row at a time.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch


def audio_token_count(mel_len: int) -> int:
    """Tokens the audio encoder emits for ``mel_len`` valid mel frames (conv stride 2, then pool 2)."""
    return ((mel_len - 1) // 2 + 1 - 2) // 2 + 1


def _vision_block(grid_thw: Sequence[int], seconds_per_grid: float, pps: float, merge: int) -> np.ndarray:
    t, h, w = (int(x) for x in grid_thw)
    gh, gw = h // merge, w // merge
    # float32 like transformers (torch default dtype), truncated to int64.
    t_ticks = (torch.arange(t) * torch.tensor(seconds_per_grid, dtype=torch.float32) * pps).long().numpy()
    t_idx = np.repeat(t_ticks, gh * gw)
    h_idx = np.tile(np.repeat(np.arange(gh), gw), t)
    w_idx = np.tile(np.arange(gw), t * gh)
    return np.stack([t_idx, h_idx, w_idx])


def _chunks(values: np.ndarray, ticks_per_chunk: int) -> list[tuple[int, int]]:
    """[start, end) slices: a new chunk starts at the first value reaching the next multiple.

    Only one chunk boundary is crossed per element (a jump over several multiples yields
    one-element chunks), which is how transformers' processor and ``get_rope_index`` split.
    """
    bounds, start, chunk = [], 0, 1
    for i, v in enumerate(values.tolist()):
        if v >= chunk * ticks_per_chunk:
            bounds.append((start, i))
            start, chunk = i, chunk + 1
    bounds.append((start, len(values)))
    return bounds


def get_rope_index(
    input_ids: Sequence[int] | torch.Tensor,
    *,
    image_token_id: int,
    video_token_id: int,
    audio_token_id: int,
    image_grid_thw: Optional[torch.Tensor] = None,
    video_grid_thw: Optional[torch.Tensor] = None,
    video_second_per_grid: Optional[Sequence[float] | torch.Tensor] = None,
    audio_seqlens: Optional[Sequence[int] | torch.Tensor] = None,
    use_audio_in_video: bool = False,
    spatial_merge_size: int = 2,
    position_id_per_seconds: float = 25,
    seconds_per_chunk: float = 2.0,
) -> torch.Tensor:
    """Positions ``[3, len(input_ids)]`` (int64) of one unpadded row.

    ``image_grid_thw`` / ``video_grid_thw`` / ``video_second_per_grid`` / ``audio_seqlens`` (valid mel
    frames per audio, standalone and in-video alike) list this row's media in order of appearance.
    """
    ids = np.asarray(input_ids.tolist() if isinstance(input_ids, torch.Tensor) else input_ids, dtype=np.int64)
    n = len(ids)
    is_media = (ids == image_token_id) | (ids == video_token_id) | (ids == audio_token_id)
    media_pos = np.flatnonzero(is_media)
    blocks: list[np.ndarray] = []
    counters = {"image": 0, "video": 0, "audio": 0}

    def nxt() -> int:
        return int(blocks[-1].max()) + 1 if blocks else 0

    def emit_text(length: int) -> None:
        if length > 0:
            blocks.append(np.broadcast_to(np.arange(length) + nxt(), (3, length)))

    def take(kind: str) -> int:
        k = counters[kind]
        counters[kind] += 1
        return k

    def audio_len(k: int) -> int:
        if audio_seqlens is None or k >= len(audio_seqlens):
            raise ValueError(f"audio placeholder token (id {audio_token_id}) number {k + 1} has no audio: the row "
                             f"brings {0 if audio_seqlens is None else len(audio_seqlens)} audio(s); remove the "
                             "stray placeholder from the text or add the audio")
        return audio_token_count(int(audio_seqlens[k]))

    cursor = 0
    while True:
        ahead = media_pos[media_pos >= cursor]
        if len(ahead) == 0:
            break
        m = int(ahead[0])
        tok = ids[m]
        interleaved = tok == video_token_id and use_audio_in_video
        emit_text(m - cursor - (2 if interleaved else 1))
        bos = nxt()
        blocks.append(np.full((3, 2 if interleaved else 1), bos))
        base = bos + 1
        if tok == audio_token_id:
            length = audio_len(take("audio"))
            blocks.append(np.broadcast_to(np.arange(length) + base, (3, length)))
        else:
            kind = "image" if tok == image_token_id else "video"
            k = take(kind)
            grids = image_grid_thw if kind == "image" else video_grid_thw
            if grids is None or k >= len(grids):
                raise ValueError(f"{kind} placeholder token (id {int(tok)}) at position {m} has no {kind}: the row "
                                 f"brings {0 if grids is None else len(grids)} {kind}(s); remove the stray "
                                 f"placeholder from the text or add the {kind}")
            grid = grids[k].tolist()
            spg = 1.0 if kind == "image" else float(video_second_per_grid[k])
            vis = _vision_block(grid, spg, position_id_per_seconds, spatial_merge_size) + base
            length = vis.shape[1]
            if not interleaved:
                blocks.append(vis)
            else:
                a_len = audio_len(take("audio"))
                aud = np.broadcast_to(np.arange(a_len) + base, (3, a_len))
                tpc = int(position_id_per_seconds * seconds_per_chunk)
                v_chunks, a_chunks = _chunks(vis[0] - base, tpc), _chunks(aud[0] - base, tpc)
                for j in range(max(len(v_chunks), len(a_chunks))):
                    if j < len(v_chunks):
                        blocks.append(vis[:, v_chunks[j][0]:v_chunks[j][1]])
                    if j < len(a_chunks):
                        blocks.append(aud[:, a_chunks[j][0]:a_chunks[j][1]])
                length += a_len
        blocks.append(np.full((3, 2 if interleaved else 1), nxt()))
        cursor = m + length + (2 if interleaved else 1)
    emit_text(n - cursor)
    pos = np.concatenate(blocks, axis=1) if blocks else np.zeros((3, 0), dtype=np.int64)
    if pos.shape[1] != n:
        raise ValueError(f"media spans do not match the grids/audio lengths: {pos.shape[1]} positions for {n} tokens")
    return torch.from_numpy(np.ascontiguousarray(pos, dtype=np.int64))
