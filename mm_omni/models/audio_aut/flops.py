"""Model FLOPs of the AuT audio encoder (matmuls and convolutions, fwd+bwd: 3x the forward's), for MFU.

Counted per chunk at its own length (the padding to a batch's longest chunk is left out), attention per
window of ``n_window_infer`` frames; elementwise work is left out.
"""

from __future__ import annotations

from typing import Sequence

from mm_omni.models.audio_aut.config import FULL_CHUNK_TOKENS


def _chunk_frames(frames: int, chunk: int) -> list[int]:
    return [chunk] * (frames // chunk) + ([frames % chunk] if frames % chunk else [])


def aut_flops(cfg, mel_frames: Sequence[int]) -> float:
    """Front end, blocks, head, fwd+bwd, for clips of these mel-frame lengths (``cfg``: an ``AuTEncoderConfig``)."""
    d, f, layers = cfg.hidden_size, cfg.ffn_hidden_size or 4 * cfg.hidden_size, cfg.num_layers
    c = cfg.downsample_hidden_size
    chunk = 2 * cfg.n_window
    window = FULL_CHUNK_TOKENS * (cfg.n_window_infer // chunk)
    total = 0.0
    for frames in mel_frames:
        tokens = 0
        for length in _chunk_frames(frames, chunk):
            mel, time = cfg.num_mel_bins, length
            for in_channels in (1, c, c):  # 3x3 convolutions, stride 2
                mel, time = (mel - 1) // 2 + 1, (time - 1) // 2 + 1
                total += 2 * mel * time * c * in_channels * 9
            total += 2 * time * c * mel * d  # conv_out
            tokens += time
        windows = _chunk_frames(tokens, window)
        total += (2 * tokens * layers * (4 * d * d + 2 * d * f) + layers * sum(4 * d * w * w for w in windows)
                  + 2 * tokens * (d * d + d * cfg.output_dim))
    return 3 * total
