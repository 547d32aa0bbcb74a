"""Template ``qwen2_omni``: Qwen2.5-Omni's processor, special tokens, media blocks and positions.

``<image>`` -> ``<|vision_bos|><|IMAGE|><|vision_eos|>``, ``<video>`` -> ``<|vision_bos|><|VIDEO|><|vision_eos|>``,
``<audio>`` -> ``<|audio_bos|><|AUDIO|><|audio_eos|>`` inside the shared ChatML turns
(:class:`mm_omni.data.template.ChatTemplate`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mm_omni.data.processor import RopeParams, SpecialTokens
from mm_omni.data.template import ChatTemplate
from mm_omni.models.rope_index import get_rope_index

# model.json field -> SpecialTokens attribute
_MODEL_FIELDS = dict(image_token_id="image", video_token_id="video", audio_token_id="audio",
                     vision_start_token_id="vision_bos", vision_end_token_id="vision_eos",
                     audio_start_token_id="audio_bos", audio_end_token_id="audio_eos")


class Qwen2OmniTemplate(ChatTemplate):
    name = "qwen2_omni"
    media = ("image", "video", "audio")

    def load_processor(self, model_name_or_path: str):
        from transformers import Qwen2_5OmniProcessor

        return Qwen2_5OmniProcessor.from_pretrained(model_name_or_path, local_files_only=True)

    def special_tokens(self, processor) -> SpecialTokens:
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
        return SpecialTokens(pad=pad, strings=strings, **ids)

    def model_token_ids(self, tokens: SpecialTokens) -> dict[str, int]:
        return {field: getattr(tokens, attr) for field, attr in _MODEL_FIELDS.items()}

    def rope_params(self, processor, model_name_or_path: Optional[str] = None) -> RopeParams:
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

    def media_blocks(self, tokens: SpecialTokens) -> dict[str, str]:
        s = tokens.strings
        return {"image": s["vision_bos"] + s["image"] + s["vision_eos"],
                "video": s["vision_bos"] + s["video"] + s["vision_eos"],
                "audio": s["audio_bos"] + s["audio"] + s["audio_eos"]}

    def positions(self, ids: np.ndarray, out: dict, in_video: bool, tokens: SpecialTokens,
                  rope: RopeParams) -> torch.Tensor:
        mel_lens = out["feature_attention_mask"].sum(-1) if "feature_attention_mask" in out else None
        return get_rope_index(
            ids,
            image_token_id=tokens.image, video_token_id=tokens.video, audio_token_id=tokens.audio,
            image_grid_thw=out.get("image_grid_thw"), video_grid_thw=out.get("video_grid_thw"),
            video_second_per_grid=out.get("video_second_per_grid"), audio_seqlens=mel_lens,
            use_audio_in_video=in_video, spatial_merge_size=rope.spatial_merge_size,
            position_id_per_seconds=rope.position_id_per_seconds, seconds_per_chunk=rope.seconds_per_chunk,
        )


TEMPLATE = Qwen2OmniTemplate()
