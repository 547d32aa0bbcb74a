"""The one place that calls transformers' ``Qwen2_5OmniProcessor``.

transformers moves under us: in 5.23 the audio-in-video switch is ``load_audio_from_video`` plus
``audio_from_video_indices`` (``use_audio_in_video`` is deprecated, removed in 5.25); older releases
only know ``use_audio_in_video``. :func:`run_processor` hides that difference. Special token ids and
the M-RoPE time constants are read from the processor / HF config, never hard-coded.
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from mm_omni.config.data import PreprocessParameters
from mm_omni.data.media import Video

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OmniTokens:
    """Token strings and ids of the multimodal / chat special tokens."""

    image: int
    video: int
    audio: int
    vision_bos: int
    vision_eos: int
    audio_bos: int
    audio_eos: int
    im_start: int
    im_end: int
    pad: int
    strings: dict  # name -> token text (image, video, audio, vision_bos, ...)


@dataclass(frozen=True)
class RopeParams:
    spatial_merge_size: int
    position_id_per_seconds: float
    seconds_per_chunk: float


def load_processor(model_name_or_path: str):
    from transformers import Qwen2_5OmniProcessor

    return Qwen2_5OmniProcessor.from_pretrained(model_name_or_path, local_files_only=True)


def omni_tokens(processor) -> OmniTokens:
    tok = processor.tokenizer
    names = dict(image="image_token", video="video_token", audio="audio_token",
                 vision_bos="vision_bos_token", vision_eos="vision_eos_token",
                 audio_bos="audio_bos_token", audio_eos="audio_eos_token")
    strings = {k: getattr(processor, v) for k, v in names.items()}
    strings.update(im_start="<|im_start|>", im_end="<|im_end|>")
    ids = {k: tok.convert_tokens_to_ids(s) for k, s in strings.items()}
    unknown = [strings[k] for k, i in ids.items() if i is None or i == tok.unk_token_id]
    if unknown:
        raise ValueError(f"tokenizer of the processor lacks special tokens {unknown}")
    pad = tok.pad_token_id if tok.pad_token_id is not None else ids["im_end"]
    return OmniTokens(pad=pad, strings=strings, **ids)


def model_token_ids(tokens: OmniTokens) -> dict[str, int]:
    """The tokenizer's special ids under model.json's field names."""
    return dict(image_token_id=tokens.image, video_token_id=tokens.video, audio_token_id=tokens.audio,
                vision_start_token_id=tokens.vision_bos, vision_end_token_id=tokens.vision_eos,
                audio_start_token_id=tokens.audio_bos, audio_end_token_id=tokens.audio_eos)


def rope_params(processor, model_name_or_path: Optional[str] = None) -> RopeParams:
    """Time constants from the HF config (thinker_config) when present, else the processor's."""
    # processor attributes in transformers >= 5.2x; before, defaults of its video kwargs (the same 25 and 2.0)
    pps = float(getattr(processor, "position_id_per_seconds", None) or 25)
    spc = float(getattr(processor, "seconds_per_chunk", None) or 2.0)
    cfg_path = Path(model_name_or_path or "") / "config.json"
    if model_name_or_path and cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        thinker = cfg.get("thinker_config", cfg)
        if (thinker.get("position_id_per_seconds", pps), thinker.get("seconds_per_chunk", spc)) != (pps, spc):
            # Token layout (processor) and positions (config) must agree, or audio-in-video breaks.
            raise ValueError(
                f"{cfg_path}: position_id_per_seconds/seconds_per_chunk "
                f"{thinker.get('position_id_per_seconds')}/{thinker.get('seconds_per_chunk')} differ from the "
                f"processor's {pps}/{spc}: make them equal"
            )
    return RopeParams(processor.image_processor.merge_size, pps, spc)


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
    """Run the Omni processor on one rendered conversation.

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
