"""Template ``qwen3_omni``: Qwen3-Omni's processor, special tokens, media blocks and positions.

``<image>`` -> ``<|vision_start|><|image_pad|><|vision_end|>``, ``<video>`` ->
``<|vision_start|><|video_pad|><|vision_end|>``, ``<audio>`` -> ``<|audio_start|><|audio_pad|><|audio_end|>``
inside the shared ChatML turns (:class:`mm_omni.data.template.ChatTemplate`), as Qwen3-Omni's chat template
renders them. Like that chat template, a row without a system turn gets none (unless
``basic_parameters.default_system`` names one). Positions are float (see
:mod:`mm_omni.models.qwen3_omni_moe.rope_index`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mm_omni.data.processor import RopeParams, SpecialTokens
from mm_omni.data.template import ChatTemplate
from mm_omni.models.qwen3_omni_moe.rope_index import get_rope_index

# model.json field -> SpecialTokens attribute
_MODEL_FIELDS = dict(image_token_id="image", video_token_id="video", audio_token_id="audio",
                     vision_start_token_id="vision_bos", vision_end_token_id="vision_eos",
                     audio_start_token_id="audio_bos", audio_end_token_id="audio_eos")


@dataclass(frozen=True)
class Qwen3OmniRopeParams(RopeParams):
    n_window: int = 50  # the audio encoder's window (half of it in mel frames): sets the audio token count


class Qwen3OmniTemplate(ChatTemplate):
    name = "qwen3_omni"
    media = ("image", "video", "audio")
    default_system = None

    def load_processor(self, model_name_or_path: str):
        from transformers import Qwen3OmniMoeProcessor

        return Qwen3OmniMoeProcessor.from_pretrained(model_name_or_path, local_files_only=True)

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

    def rope_params(self, processor, model_name_or_path: Optional[str] = None) -> Qwen3OmniRopeParams:
        """Time ticks and audio window from the checkpoint's config.json (thinker_config) when there is one,
        else the processor's; where both exist they must agree (the processor lays out the tokens with its
        values, the model's positions and audio encoder use the config's)."""
        pps = float(processor.position_id_per_seconds)
        n_window = int(processor.n_window)
        cfg_path = Path(model_name_or_path or "") / "config.json"
        if model_name_or_path and cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            thinker = cfg.get("thinker_config", cfg)
            stated = {"position_id_per_seconds": thinker.get("position_id_per_seconds", pps),
                      "n_window": thinker.get("audio_config", {}).get("n_window", n_window)}
            ours = {"position_id_per_seconds": pps, "n_window": n_window}
            differ = [k for k in stated if float(stated[k]) != float(ours[k])]
            if differ:
                said = ", ".join(f"{k}={stated[k]}" for k in differ)
                has = ", ".join(f"{k}={ours[k]}" for k in differ)
                raise ValueError(
                    f"{cfg_path}: thinker_config (position_id_per_seconds, audio_config.n_window) gives {said} but "
                    f"the processor has {has}: the token layout (processor) and the positions / audio encoder "
                    "(config) would disagree; make them equal"
                )
        return Qwen3OmniRopeParams(processor.image_processor.merge_size, pps, float(processor.seconds_per_chunk),
                                   n_window)

    def media_blocks(self, tokens: SpecialTokens) -> dict[str, str]:
        s = tokens.strings
        return {"image": s["vision_bos"] + s["image"] + s["vision_eos"],
                "video": s["vision_bos"] + s["video"] + s["vision_eos"],
                "audio": s["audio_bos"] + s["audio"] + s["audio_eos"]}

    def positions(self, ids: np.ndarray, out: dict, in_video: bool, tokens: SpecialTokens,
                  rope: Qwen3OmniRopeParams) -> torch.Tensor:
        # in_video needs no reading here: an audio-in-video span is marked in the tokens themselves
        mel_lens = out["feature_attention_mask"].sum(-1) if "feature_attention_mask" in out else None
        return get_rope_index(
            ids,
            image_token_id=tokens.image, video_token_id=tokens.video, audio_token_id=tokens.audio,
            vision_start_token_id=tokens.vision_bos, audio_start_token_id=tokens.audio_bos,
            image_grid_thw=out.get("image_grid_thw"), video_grid_thw=out.get("video_grid_thw"),
            video_second_per_grid=out.get("video_second_per_grid"), audio_seqlens=mel_lens,
            spatial_merge_size=rope.spatial_merge_size, position_id_per_seconds=rope.position_id_per_seconds,
            n_window=rope.n_window,
        )


TEMPLATE = Qwen3OmniTemplate()
