"""Model FLOPs of the audio encoder (matmuls, fwd+bwd: 3x the forward's), for --log-tps's MFU.

Attention is per ``n_window``-token chunk; elementwise work is left out.
"""

from __future__ import annotations

from typing import Sequence


def audio_flops(cfg, mel_frames: Sequence[int]) -> float:
    """Conv stem, blocks, pooled projection, fwd+bwd, for clips of these mel-frame lengths."""
    ha, fa, layers = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers
    total = 0.0
    for m in mel_frames:
        tokens = (m - 1) // 2 + 1
        total += (2 * m * cfg.num_mel_bins * 3 * ha + 2 * tokens * ha * 3 * ha
                  + layers * (2 * tokens * (4 * ha * ha + 2 * ha * fa) + 4 * ha * tokens * cfg.n_window)
                  + 2 * (tokens // 2) * ha * cfg.output_dim)
    return 3 * total
