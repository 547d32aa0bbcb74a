"""model.json of Qwen3-Omni's thinker: the shared schema with the Qwen3 stacks in its encoder blocks.

The blocks keep MindSpeed-MM's keys (``image_encoder.vision_encoder`` / ``vision_projector``,
``audio_encoder.audio_encoder``, ``text_decoder``); their stacks are the Qwen3-VL-style vision encoder
(:class:`~mm_omni.models.vision_qwen3.config.Qwen3VisionEncoderConfig`, with deepstack mergers that share the
projector's config) and the AuT audio encoder (:class:`~mm_omni.models.audio_aut.config.AuTEncoderConfig`);
the decoder is the shared text decoder in its Qwen3-MoE form (q/k norm, interleaved M-RoPE, experts).
"""

from __future__ import annotations

from typing import Optional

from mm_omni.config.model import OmniModelConfig, TextDecoderConfig, VisionProjectorConfig, _ParallelSizes
from mm_omni.models.audio_aut.config import AuTEncoderConfig
from mm_omni.models.vision_qwen3.config import Qwen3VisionEncoderConfig


class Qwen3ImageEncoderBlock(_ParallelSizes):
    vision_encoder: Qwen3VisionEncoderConfig
    vision_projector: VisionProjectorConfig


class AuTEncoderBlock(_ParallelSizes):
    audio_encoder: AuTEncoderConfig


class Qwen3OmniModelConfig(OmniModelConfig):
    """The whole model.json. ``position_id_per_seconds`` has no default: the checkpoint's value (13 in the
    released config.json; transformers' class default is 25) must be stated, as the converter writes it.
    Qwen3-Omni has no audio-in-video chunks: ``seconds_per_chunk`` must stay unset."""

    model_id: str = "qwen3_omni_moe"
    position_id_per_seconds: int
    seconds_per_chunk: Optional[int] = None
    image_encoder: Optional[Qwen3ImageEncoderBlock] = None
    audio_encoder: Optional[AuTEncoderBlock] = None
    text_decoder: TextDecoderConfig
