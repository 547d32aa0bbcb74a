"""pydantic configs of ``mm-convert`` (the ``--cfg.*`` options; MindSpeed-MM's field names).

Validation that needs only the options happens here; checks against the model (layer counts, TP
divisibility, encoder-before-decoder) happen in the converter before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, PrivateAttr, field_validator

PPLayers = Union[list[list[NonNegativeInt]], list[NonNegativeInt]]
Dtype = Literal["bf16", "fp16", "fp32"]
OMNI_TYPES = ("qwen2_5_omni", "qwen2_5_omni_thinker")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def nested(layers: Optional[PPLayers]) -> Optional[list[list[int]]]:
    """MindSpeed-MM's flat ``[11,17]`` (one chunk) and nested ``[[11,17]]`` forms -> nested."""
    if layers is None:
        return None
    if layers and all(isinstance(n, int) for n in layers):
        return [list(layers)]  # type: ignore[arg-type]
    return [list(chunk) for chunk in layers]  # type: ignore[union-attr]


class HfConfig(_Strict):
    hf_dir: Path = Field(description="Hugging Face Qwen2.5-Omni checkpoint directory (config.json + *.safetensors)")
    _config = PrivateAttr(default=None)

    @field_validator("hf_dir")
    @classmethod
    def _is_omni_checkpoint(cls, path: Path) -> Path:
        if not path.is_dir():
            raise ValueError(f"hf_dir={path}: no such directory; pass the Hugging Face checkpoint directory")
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"hf_dir={path}: no config.json, so not a Hugging Face checkpoint")
        model_type = json.loads(cfg_file.read_text()).get("model_type")
        if model_type not in OMNI_TYPES:
            raise ValueError(f"hf_dir={path}: config.json has model_type={model_type!r}, not a Qwen2.5-Omni "
                             f"checkpoint (expected one of {OMNI_TYPES})")
        if not any(path.glob("*.safetensors")):
            raise ValueError(f"hf_dir={path}: no *.safetensors files (only safetensors checkpoints are supported)")
        return path

    @property
    def config(self):
        """The transformers config (``Qwen2_5OmniConfig`` or a bare thinker's), read locally."""
        if self._config is None:
            from transformers import AutoConfig

            self._config = AutoConfig.from_pretrained(self.hf_dir, local_files_only=True)
        return self._config

    @property
    def thinker(self):
        return getattr(self.config, "thinker_config", self.config)


class ParallelConfig(_Strict):
    """Per-module pipeline layout and TP. Outer list = virtual-pipeline chunks, inner = PP stages."""

    llm_pp_layers: PPLayers = Field(description="text decoder layers per PP stage, e.g. [[11,17]] (flat [11,17] "
                                                "= one chunk; [[a,b],[c,d]] = 2 virtual-pipeline chunks x 2 stages)")
    vit_pp_layers: PPLayers = Field(description="vision encoder layers per stage, same shape, e.g. [[32,0]]; "
                                                "encoders must end on or before the decoder's first stage")
    audio_pp_layers: Optional[PPLayers] = Field(None, description="audio encoder layers per stage, e.g. [[32,0]] "
                                                                  "(default: all on the first stage)")
    tp_size: PositiveInt = Field(1, description="tensor-parallel size of the text decoder (and default of the others)")
    vit_tp_size: Optional[NonNegativeInt] = Field(0, description="TP size of the vision encoder+projector; 0 = tp_size")
    audio_tp_size: Optional[NonNegativeInt] = Field(0, description="TP size of the audio encoder; 0 = tp_size")
    ep_size: Optional[PositiveInt] = Field(1, description="expert parallel size; Qwen2.5-Omni is dense: must be 1")

    @field_validator("ep_size")
    @classmethod
    def _dense(cls, v):
        if v not in (None, 1):
            raise ValueError(f"ep_size={v}: Qwen2.5-Omni has no experts; use 1")
        return v

    def tp(self) -> dict[str, int]:
        return {"text": self.tp_size, "vision": self.vit_tp_size or self.tp_size,
                "audio": self.audio_tp_size or self.tp_size}

    def counts(self, audio_layers: int) -> dict[str, list[list[int]]]:
        llm = nested(self.llm_pp_layers)
        audio = nested(self.audio_pp_layers)
        if audio is None:  # MindSpeed-MM's optional audio list: all audio layers on the first stage
            audio = [[0] * len(chunk) for chunk in llm]
            audio[0][0] = audio_layers
        return {"vision": nested(self.vit_pp_layers), "audio": audio, "text": llm}


class _Common(_Strict):
    mm_dir: Path = Field(description="Megatron checkpoint directory (MindSpeed-MM layout: release/ or iter_*/ "
                                     "with mp_rank_XX[_YYY]/model_optim_rng.pt)")
    hf_config: HfConfig = Field(description="the original Hugging Face checkpoint")
    dtype: Optional[Dtype] = Field(None, description="cast converted thinker weights to bf16/fp16/fp32 "
                                                     "(default: keep each tensor's dtype)")
    overwrite: bool = Field(False, description="replace a non-empty output directory")


class HfToMmConfig(_Common):
    parallel_config: ParallelConfig = Field(description="the layout to write")
    test_convert_precision: bool = Field(False, description="after converting, run transformers' thinker and ours on "
                                                            "the same tiny input and report the difference")


_LORA_LOAD_DIR = ("a LoRA run's adapter-only checkpoint (its --save); the source directory is then the base "
                  "checkpoint that run loaded (its --load)")


class MmToHfConfig(_Common):
    save_hf_dir: Path = Field(description="where the Hugging Face checkpoint is written (thinker converted, "
                                          "talker/token2wav and all other files taken from hf_dir)")
    parallel_config: Optional[ParallelConfig] = Field(
        None, description="optional: the layout is read from the checkpoint; if given it must match")
    lora_alpha: Optional[float] = Field(None, description="LoRA alpha of a LoRA-trained checkpoint (default: the "
                                                          "training run's saved args); adapters are merged in")
    lora_r: Optional[PositiveInt] = Field(None, description="LoRA rank (default: the saved args)")
    lora_load_dir: Optional[Path] = Field(None, description=_LORA_LOAD_DIR + " (mm_dir)")
    save_lora_as_peft: bool = Field(False, description="write only the LoRA adapters, as a PEFT adapter directory "
                                                       "(adapter_config.json + adapter_model.safetensors) for "
                                                       "hf_dir's thinker (transformers' module names, e.g. "
                                                       "model.language_model.layers.0.self_attn.q_proj), instead "
                                                       "of the merged model")


class ResplitConfig(_Strict):
    source_dir: Path = Field(description="Megatron checkpoint to read (any layout this tool writes)")
    target_dir: Path = Field(description="where the re-split checkpoint is written")
    target_parallel_config: ParallelConfig = Field(description="the layout to write")
    source_parallel_config: Optional[ParallelConfig] = Field(
        None, description="optional: the source layout is read from the checkpoint; if given it must match")
    hf_config: Optional[HfConfig] = Field(None, description="architecture (config.json only, no weights read); "
                                                            "default: hf_config.json saved by hf_to_mm in source_dir")
    dtype: Optional[Dtype] = Field(None, description="cast weights to bf16/fp16/fp32 (default: keep)")
    overwrite: bool = Field(False, description="replace a non-empty target directory")
    lora_alpha: Optional[float] = Field(None, description="LoRA alpha of a LoRA-trained source (default: its saved "
                                                          "args); adapters are merged into the written weights")
    lora_r: Optional[PositiveInt] = Field(None, description="LoRA rank (default: the saved args)")
    lora_load_dir: Optional[Path] = Field(None, description=_LORA_LOAD_DIR + " (source_dir)")
