"""The module config of the AuT audio encoder: the Whisper-style audio keys plus the AuT front end's."""

from __future__ import annotations

from pydantic import Field, model_validator

from mm_omni.config.model import AudioEncoderConfig


def conv_frames(frames: int) -> int:
    """Time steps after the three stride-2 convolutions (kernel 3, padding 1) of ``frames`` mel frames."""
    for _ in range(3):
        frames = (frames - 1) // 2 + 1
    return frames


# transformers' output-length rule counts 13 tokens for every full chunk, whatever n_window says
FULL_CHUNK_TOKENS = 13


class AuTEncoderConfig(AudioEncoderConfig):
    model_id: str = "qwen3_omni_aut"
    n_window: int = Field(default=50, gt=0)  # a chunk is 2 * n_window mel frames; positions restart in each
    n_window_infer: int = Field(default=800, gt=0)  # attention window, in mel frames (a multiple of a chunk)
    conv_chunksize: int = Field(default=500, gt=0)  # chunks per convolution call: memory only, same math
    downsample_hidden_size: int = Field(default=480, gt=0)  # channels of the three Conv2d

    @model_validator(mode="after")
    def _check_windows(self):
        tokens = conv_frames(2 * self.n_window)
        if tokens != FULL_CHUNK_TOKENS:
            raise ValueError(f"n_window={self.n_window}: a chunk of {2 * self.n_window} mel frames gives {tokens} "
                             f"tokens but transformers' output-length rule counts {FULL_CHUNK_TOKENS} per chunk "
                             "(its encoder only works when they agree): use n_window in 49..52 (50 in Qwen3-Omni)")
        if self.n_window_infer < 2 * self.n_window:
            raise ValueError(f"n_window_infer={self.n_window_infer} is shorter than one chunk (2 * n_window = "
                             f"{2 * self.n_window} mel frames): use a multiple of {2 * self.n_window}")
        if self.max_source_positions < FULL_CHUNK_TOKENS:
            raise ValueError(f"max_source_positions={self.max_source_positions}: a chunk's {FULL_CHUNK_TOKENS} "
                             f"tokens each need a position; use at least {FULL_CHUNK_TOKENS}")
        return self
