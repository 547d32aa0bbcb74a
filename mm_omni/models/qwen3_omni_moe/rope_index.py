"""3D position ids (M-RoPE) of one Qwen3-Omni sequence, equal to transformers' Qwen3-Omni ``get_rope_index``.

Positions are float32: a video's time axis is ``frame-group index * seconds per group *
position_id_per_seconds`` without truncation (2 frames at 3 fps and 13 ticks/s: 0, 8.67, 17.33, ...), and
whatever follows continues from that. Rules (per row, left to right; "next" = max over the three axes of
the previously emitted block + 1, as transformers does: the max of the *last* block only):

* text token: next, on all three axes;
* image / video span ``<vision_start> V... <vision_end>``: start marker = next; vision tokens =
  base + (t, h, w) with base = marker + 1, h/w = merged patch row/column (an image has t = 0); end = next;
* audio span ``<audio_start> A... <audio_end>``: the start marker, then one position per audio token, then
  the end marker, consecutive;
* audio in video ``<vision_start><audio_start> ... <audio_end><vision_end>``: the two start markers take
  two consecutive positions; the video (base + (t, h, w)) and its audio (base + 0, 1, 2, ...) share one
  base and are merged token by token in time order (video first on a tie), the order the processor laid
  the tokens out in; the two end markers continue from the last merged token.

Runs in data workers (torch CPU), one row at a time.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch


def audio_token_count(mel_len: int, n_window: int) -> int:
    """Tokens the AuT encoder emits for ``mel_len`` valid mel frames.

    Windows of ``2 * n_window`` frames give 13 tokens each (three stride-2 convolutions of 100 frames, as
    transformers counts it for any ``n_window``); the rest goes through the same three halvings.
    """
    chunk = 2 * n_window
    rest = (mel_len % chunk - 1) // 2 + 1
    return ((rest - 1) // 2 + 1 - 1) // 2 + 1 + (mel_len // chunk) * 13


def _vision(grid_thw: Sequence[int], seconds_per_grid: float, pps: float, merge: int) -> torch.Tensor:
    """``[3, t * h/merge * w/merge]`` positions of one image / video relative to its base (float32)."""
    t, h, w = (int(x) for x in grid_thw)
    gh, gw = h // merge, w // merge
    # float32 products in transformers' order: (index * seconds per group) * ticks per second
    ticks = torch.arange(t) * torch.tensor(seconds_per_grid, dtype=torch.float32) * pps
    t_idx = ticks.view(-1, 1).expand(-1, gh * gw).flatten()
    h_idx = torch.arange(gh).view(1, -1, 1).expand(t, -1, gw).flatten().float()
    w_idx = torch.arange(gw).view(1, 1, -1).expand(t, gh, -1).flatten().float()
    return torch.stack([t_idx, h_idx, w_idx])


def _run(length: int, start: torch.Tensor) -> torch.Tensor:
    """``length`` consecutive positions from ``start`` on all three axes."""
    return torch.arange(length, dtype=torch.float32).view(1, -1).expand(3, -1) + start


def get_rope_index(
    input_ids: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    image_token_id: int,
    video_token_id: int,
    audio_token_id: int,
    vision_start_token_id: int,
    audio_start_token_id: int,
    image_grid_thw: Optional[torch.Tensor] = None,
    video_grid_thw: Optional[torch.Tensor] = None,
    video_second_per_grid: Optional[Sequence[float] | torch.Tensor] = None,
    audio_seqlens: Optional[Sequence[int] | torch.Tensor] = None,
    spatial_merge_size: int = 2,
    position_id_per_seconds: float = 13,
    n_window: int = 50,
) -> torch.Tensor:
    """Positions ``[3, len(input_ids)]`` (float32) of one unpadded row.

    ``image_grid_thw`` / ``video_grid_thw`` / ``video_second_per_grid`` / ``audio_seqlens`` (valid mel frames
    per audio, standalone and in-video alike) list this row's media in order of appearance. Whether a video
    carries its audio is read from the layout (a start marker right after ``<vision_start>``), as
    transformers does.
    """
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long).reshape(-1)
    n = len(ids)
    markers = torch.nonzero((ids == vision_start_token_id) | (ids == audio_start_token_id)).flatten().tolist()
    blocks: list[torch.Tensor] = []
    counters = {"image": 0, "video": 0, "audio": 0}

    def nxt() -> torch.Tensor:
        return blocks[-1].max() + 1 if blocks else torch.tensor(0.0)

    def take(kind: str, available: int) -> int:
        k = counters[kind]
        if k >= available:
            raise ValueError(f"{kind} span number {k + 1} of the row has no {kind}: the row brings {available} "
                             f"{kind}(s); remove the stray placeholder from the text or add the {kind}")
        counters[kind] += 1
        return k

    def audio_len() -> int:
        k = take("audio", 0 if audio_seqlens is None else len(audio_seqlens))
        return audio_token_count(int(audio_seqlens[k]), n_window)

    def vision(kind: str) -> torch.Tensor:
        grids = image_grid_thw if kind == "image" else video_grid_thw
        k = take(kind, 0 if grids is None else len(grids))
        seconds = 1.0 if kind == "image" else float(video_second_per_grid[k])
        return _vision(grids[k].tolist(), seconds, position_id_per_seconds, spatial_merge_size)

    cursor = 0
    for m in markers:
        if m < cursor:  # the audio start inside an audio-in-video span, already consumed
            continue
        start = nxt()
        if m > cursor:
            blocks.append(_run(m - cursor, start))
            start = start + (m - cursor)
        following = int(ids[m + 1]) if m + 1 < n else None
        in_video = int(ids[m]) == vision_start_token_id and following == audio_start_token_id
        marks = 2 if in_video else 1
        blocks.append(_run(marks, start))
        base = start + marks
        if int(ids[m]) == audio_start_token_id:
            length = audio_len()
            blocks.append(_run(length, base))
            expected = [audio_token_id]
        elif in_video:
            vis = vision("video") + base
            aud = _run(audio_len(), base)
            length = vis.shape[1] + aud.shape[1]
            i = j = 0
            while i < vis.shape[1] and j < aud.shape[1]:  # one token at a time, earlier first, video on a tie
                if vis[0, i] <= aud[0, j]:
                    blocks.append(vis[:, i:i + 1])
                    i += 1
                else:
                    blocks.append(aud[:, j:j + 1])
                    j += 1
            for rest, k in ((vis, i), (aud, j)):
                if k < rest.shape[1]:
                    blocks.append(rest[:, k:])
            expected = [video_token_id, audio_token_id]
        elif following in (image_token_id, video_token_id):
            kind = "image" if following == image_token_id else "video"
            blocks.append(vision(kind) + base)
            length = blocks[-1].shape[1]
            expected = [following]
        else:
            raise ValueError(f"<vision_start> (id {vision_start_token_id}) at position {m} is followed by token "
                             f"{following}, not an image, video or audio placeholder: the row's text holds a stray "
                             "vision start marker")
        body = ids[m + marks:m + marks + length]
        if len(body) != length or not bool(torch.isin(body, torch.tensor(expected)).all()):
            raise ValueError(f"the media span at position {m} does not hold the {length} placeholder tokens its "
                             "grid / audio length give: the text and the media of the row disagree")
        blocks.append(_run(marks, nxt()))
        cursor = m + marks + length + marks
    if cursor < n:
        blocks.append(_run(n - cursor, nxt()))
    pos = torch.cat(blocks, dim=1) if blocks else torch.zeros(3, 0)
    if pos.shape[1] != n:
        raise ValueError(f"media spans do not match the grids/audio lengths: {pos.shape[1]} positions for {n} tokens")
    return pos.contiguous()
