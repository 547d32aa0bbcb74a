"""Template ``qwen2vl``: Qwen2.5-VL's processor, special tokens, media blocks and positions.

``<image>`` -> ``<|vision_start|><|image_pad|><|vision_end|>``, ``<video>`` ->
``<|vision_start|><|video_pad|><|vision_end|>`` inside the shared ChatML turns
(:class:`mm_omni.data.template.ChatTemplate`), as Qwen2.5-VL's chat template writes them; the processor expands
each pad token to the media's feature count. Token ids come from the tokenizer, never from constants.

Positions: Qwen2.5-VL's M-RoPE is Qwen2.5-Omni's without audio, video time scaled by
``vision_config.tokens_per_second`` (:mod:`mm_omni.models.rope_index`). Text after a video starts one past the
video's largest position, as the Qwen team's original code, transformers up to 5.2 and transformers' own
Qwen2.5-Omni do; transformers' Qwen2.5-VL ``get_rope_index`` since 5.3 starts it at ``max(h, w) / merge`` past
the video's first position instead, which differs once a video's time span exceeds its merged height and width
(tests/parity/test_qwen2_5_vl_positions.py shows both).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mm_omni.data.processor import RopeParams, SpecialTokens
from mm_omni.data.template import ChatTemplate
from mm_omni.models.rope_index import get_rope_index

logger = logging.getLogger(__name__)

# model.json field -> SpecialTokens attribute
_MODEL_FIELDS = dict(image_token_id="image", video_token_id="video",
                     vision_start_token_id="vision_bos", vision_end_token_id="vision_eos")
# the markers around a media block: Qwen2.5-VL's chat template writes them as literal text (the processor
# and tokenizer name no attribute for them); their ids are read from the tokenizer
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
# every released Qwen2.5-VL config.json states vision_config.tokens_per_second = 2
DEFAULT_TOKENS_PER_SECOND = 2


class Qwen2VLTemplate(ChatTemplate):
    name = "qwen2vl"
    media = ("image", "video")

    def load_processor(self, model_name_or_path: str):
        from transformers import Qwen2_5_VLProcessor

        return Qwen2_5_VLProcessor.from_pretrained(model_name_or_path, local_files_only=True)

    def special_tokens(self, processor) -> SpecialTokens:
        tok = processor.tokenizer
        strings = dict(image=processor.image_token, video=processor.video_token, vision_bos=VISION_START,
                       vision_eos=VISION_END, im_start="<|im_start|>", im_end="<|im_end|>")
        ids = {k: tok.convert_tokens_to_ids(s) for k, s in strings.items()}
        unknown = [strings[k] for k, i in ids.items() if i is None or i == tok.unk_token_id]
        if unknown:
            raise ValueError(f"tokenizer of the processor lacks special tokens {unknown}")
        pad = tok.pad_token_id if tok.pad_token_id is not None else ids["im_end"]
        return SpecialTokens(audio=None, audio_bos=None, audio_eos=None, pad=pad, strings=strings, **ids)

    def model_token_ids(self, tokens: SpecialTokens) -> dict[str, int]:
        return {field: getattr(tokens, attr) for field, attr in _MODEL_FIELDS.items()}

    def rope_params(self, processor, model_name_or_path: Optional[str] = None) -> RopeParams:
        """The video time scale: ``vision_config.tokens_per_second`` of the checkpoint's config.json as
        transformers reads it (its class default where the file omits the key); 2 without a config.json."""
        tps = float(DEFAULT_TOKENS_PER_SECOND)
        cfg_path = Path(model_name_or_path or "") / "config.json"
        if model_name_or_path and cfg_path.is_file():
            from transformers import Qwen2_5_VLConfig

            tps = float(Qwen2_5_VLConfig.from_pretrained(model_name_or_path).vision_config.tokens_per_second)
        else:
            logger.info("%s: no config.json; video positions use tokens_per_second=%s (every released "
                        "Qwen2.5-VL's)", model_name_or_path, DEFAULT_TOKENS_PER_SECOND)
        # seconds_per_chunk interleaves audio with video: Qwen2.5-VL has no audio, it is never read
        return RopeParams(processor.image_processor.merge_size, tps, 0.0)

    def media_blocks(self, tokens: SpecialTokens) -> dict[str, str]:
        s = tokens.strings
        return {"image": s["vision_bos"] + s["image"] + s["vision_eos"],
                "video": s["vision_bos"] + s["video"] + s["vision_eos"]}

    def positions(self, ids: np.ndarray, out: dict, in_video: bool, tokens: SpecialTokens,
                  rope: RopeParams) -> torch.Tensor:
        return get_rope_index(
            ids, image_token_id=tokens.image, video_token_id=tokens.video, audio_token_id=None,
            image_grid_thw=out.get("image_grid_thw"), video_grid_thw=out.get("video_grid_thw"),
            video_second_per_grid=out.get("video_second_per_grid"), spatial_merge_size=rope.spatial_merge_size,
            position_id_per_seconds=rope.position_id_per_seconds,
        )


TEMPLATE = Qwen2VLTemplate()
