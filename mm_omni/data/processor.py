"""The one place that calls a family's transformers processor on a rendered row.

Which processor class, which special tokens and which M-RoPE constants is the family's template's
business (:class:`mm_omni.data.template.ChatTemplate`); the call itself is shared. transformers moves
under us: in 5.23 the audio-in-video switch is ``load_audio_from_video`` plus ``audio_from_video_indices``
(``use_audio_in_video`` is deprecated, removed in 5.25); older releases only know ``use_audio_in_video``.
:func:`run_processor` hides that difference. Special token ids and the M-RoPE time constants are read
from the processor / HF config, never hard-coded.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from mm_omni.config.data import PreprocessParameters
from mm_omni.data.media import Video

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpecialTokens:
    """Ids and strings of a template's multimodal / chat special tokens (None: the family has no such token)."""

    image: int
    video: int
    audio: Optional[int]
    vision_bos: int
    vision_eos: int
    audio_bos: Optional[int]
    audio_eos: Optional[int]
    im_start: int
    im_end: int
    pad: int
    strings: dict  # name -> token text (image, video, audio, vision_bos, ...)

    def placeholders(self) -> list[int]:
        """Ids the processor expands into media features."""
        return [i for i in (self.image, self.video, self.audio) if i is not None]

    def media_marks(self) -> list[int]:
        """Placeholders and the start/end markers around them: a cut must not fall between them."""
        return [i for i in (self.image, self.video, self.audio, self.vision_bos, self.vision_eos, self.audio_bos,
                            self.audio_eos) if i is not None]


@dataclass(frozen=True)
class RopeParams:
    spatial_merge_size: int
    position_id_per_seconds: float  # M-RoPE time ticks per second of video (and audio)
    seconds_per_chunk: float  # audio-in-video interleaving (Qwen2.5-Omni); unused by families without audio


def _has_audio_from_video_api(processor) -> bool:
    """5.23+ omni processors take ``audio_from_video_indices`` (OmniModalProcessorMixin.__call__)."""
    for cls in type(processor).__mro__:
        call = cls.__dict__.get("__call__")
        if call is not None and "audio_from_video_indices" in inspect.signature(call).parameters:
            return True
    return False


def _size(min_pixels: int, max_pixels: int) -> dict:
    # MindSpeed-MM writes 0 for "no lower bound"; transformers rejects a falsy shortest_edge.
    return {"shortest_edge": max(min_pixels, 1), "longest_edge": max_pixels}


def run_processor(
    processor,
    text: str,
    pp: PreprocessParameters,
    images: list,
    videos: list[Video],
    audios: list[Optional[np.ndarray]],
    audio_from_video: list[Optional[int]],
) -> dict[str, Any]:
    """Run a family's processor on one rendered conversation.

    ``audios`` / ``audio_from_video`` list the audio slots in the order their tokens appear in
    ``text``: ``audio_from_video[k]`` is None for a standalone ``<audio>`` and the video index for the
    audio track of that video (then the row is an audio-in-video row). Returns tensors without the
    batch dimension on ``input_ids``.
    """
    kwargs: dict[str, Any] = dict(text=[text], return_tensors="pt")
    if images:
        kwargs["images"] = images
        kwargs["images_kwargs"] = {"size": _size(pp.image_min_pixels, pp.image_max_pixels)}
    fps = None
    if videos:
        rates = {round(v.fps, 6) for v in videos}
        fps = videos[0].fps
        in_video = any(i is not None for i in audio_from_video)
        if len(rates) > 1 and in_video:
            raise ValueError("videos of one row sampled at different rates cannot interleave their audio")
        kwargs["videos"] = [v.frames for v in videos]
        kwargs["videos_kwargs"] = {
            "size": _size(pp.video_min_pixels, pp.video_max_pixels),
            "fps": fps,
        }
    if audios:
        kwargs["audio"] = list(audios)
        kwargs["audio_kwargs"] = {"sampling_rate": pp.audio_sampling_rate}
    if any(i is not None for i in audio_from_video):
        if _has_audio_from_video_api(processor):
            kwargs.update(load_audio_from_video=True, audio_from_video_indices=list(audio_from_video))
        else:  # transformers < 5.23: one audio per slot, in text order
            kwargs["use_audio_in_video"] = True
    out = processor(**kwargs)
    result = {k: v for k, v in out.items()}
    result["input_ids"] = result["input_ids"][0]
    result.pop("attention_mask", None)
    if videos:
        # The processor takes one fps per call; the rate of each video is its own.
        tps = processor.video_processor.temporal_patch_size
        result["video_second_per_grid"] = torch.tensor([tps / v.fps for v in videos], dtype=torch.float32)
    return result
