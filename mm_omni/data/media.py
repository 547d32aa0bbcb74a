"""Decode media: images with PIL, video frames and video audio tracks with PyAV, audio with librosa.

librosa cannot open video containers here (it falls back to the deprecated audioread and finds no
backend), so every container (``.mp4``, ``.mkv``, ``.m4a``...) goes through PyAV; plain audio files
(wav/flac/ogg/mp3, what libsndfile reads) go through librosa at 16 kHz.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np


class MediaError(RuntimeError):
    """A media file that cannot be decoded; the message names the file."""


@dataclass
class Video:
    frames: np.ndarray        # [T, H, W, 3] uint8
    fps: float                # effective rate of the sampled frames (drives video_second_per_grid)
    path: str


def load_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise MediaError(f"cannot read image {path}: {exc}") from exc


def _sample_indices(total: int, duration: float, fps: float, maxlen: int) -> np.ndarray:
    """Evenly spaced frame indices: ``duration * fps`` frames, at most ``maxlen`` and ``total``."""
    n = max(1, min(total, maxlen, math.floor(duration * fps)))
    return np.linspace(0, total - 1, n).round().astype(np.int64)


def load_video(path: str, fps: float, maxlen: int) -> Video:
    """Frames sampled at ``fps`` (capped by ``maxlen``) as RGB uint8."""
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise MediaError(f"no video stream in {path}")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            # Decode once; stream.frames is unreliable for some containers, so count while decoding.
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            duration = _duration(stream, container)
    except av.error.FFmpegError as exc:
        raise MediaError(f"cannot decode video {path}: {exc}") from exc
    if not frames:
        raise MediaError(f"video {path} has no frames")
    if duration <= 0:
        duration = len(frames) / float(stream.average_rate or 1)
    idx = _sample_indices(len(frames), duration, fps, maxlen)
    return Video(frames=np.stack([frames[i] for i in idx]), fps=len(idx) / duration, path=path)


def _duration(stream, container) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # av.time_base is microseconds
    return 0.0


def has_audio_track(path: str) -> bool:
    import av

    try:
        with av.open(path) as container:
            return bool(container.streams.audio)
    except av.error.FFmpegError as exc:
        raise MediaError(f"cannot open {path}: {exc}") from exc


def load_audio_track(path: str, sr: int = 16000) -> Optional[np.ndarray]:
    """The first audio stream of a container, mono float32 at ``sr``; None when it has none."""
    import av

    try:
        with av.open(path) as container:
            if not container.streams.audio:
                return None
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sr)
            chunks = []
            for frame in container.decode(container.streams.audio[0]):
                chunks.extend(r.to_ndarray().reshape(-1) for r in resampler.resample(frame))
            chunks.extend(r.to_ndarray().reshape(-1) for r in resampler.resample(None))
    except av.error.FFmpegError as exc:
        raise MediaError(f"cannot decode audio of {path}: {exc}") from exc
    if not chunks:
        raise MediaError(f"audio track of {path} is empty")
    return np.concatenate(chunks).astype(np.float32)


def load_audio(path: str, sr: int = 16000) -> np.ndarray:
    """Mono float32 at ``sr``: librosa for files libsndfile reads, PyAV for containers."""
    import soundfile as sf

    try:
        sf.info(path)
    except sf.LibsndfileError:
        wave = load_audio_track(path, sr)
        if wave is None:
            raise MediaError(f"no audio stream in {path}") from None
        return wave
    import librosa

    try:
        wave, _ = librosa.load(path, sr=sr, mono=True)
    except (sf.LibsndfileError, ValueError) as exc:
        raise MediaError(f"cannot read audio {path}: {exc}") from exc
    if wave.size == 0:
        raise MediaError(f"audio {path} is empty")
    return wave.astype(np.float32)
