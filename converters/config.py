"""pydantic configs of ``mm-convert`` (the ``--cfg.*`` options; MindSpeed-MM's field names).

Validation that needs only the options happens here; checks against the model (layer counts, TP
divisibility, encoder-before-decoder) happen in the converter before anything is written. Which
``*_pp_layers`` / ``*_tp_size`` option belongs to which module is the family's converter spec's
(:class:`mm_omni.checkpoint.spec.ModuleSpec` ``pp_option`` / ``tp_option``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, PrivateAttr, field_validator

PPLayers = Union[list[list[NonNegativeInt]], list[NonNegativeInt]]
Dtype = Literal["bf16", "fp16", "fp32"]
PP_OPTIONS = ("llm_pp_layers", "vit_pp_layers", "audio_pp_layers")
TP_OPTIONS = ("tp_size", "vit_tp_size", "audio_tp_size")


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
    hf_dir: Path = Field(description="Hugging Face checkpoint directory (config.json + *.safetensors)")
    _config = PrivateAttr(default=None)

    @field_validator("hf_dir")
    @classmethod
    def _is_registered_checkpoint(cls, path: Path) -> Path:
        from mm_omni.registry import for_hf_model_type

        if not path.is_dir():
            raise ValueError(f"hf_dir={path}: no such directory; pass the Hugging Face checkpoint directory")
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"hf_dir={path}: no config.json, so not a Hugging Face checkpoint")
        model_type = json.loads(cfg_file.read_text()).get("model_type")
        for_hf_model_type(model_type, source=f"hf_dir={path}: config.json")  # names the registered types
        if not any(path.glob("*.safetensors")):
            raise ValueError(f"hf_dir={path}: no *.safetensors files (only safetensors checkpoints are supported)")
        return path

    @property
    def model_type(self) -> Optional[str]:
        return json.loads((self.hf_dir / "config.json").read_text()).get("model_type")

    @property
    def config(self):
        """The full transformers config of config.json, read locally."""
        if self._config is None:
            from transformers import AutoConfig

            self._config = AutoConfig.from_pretrained(self.hf_dir, local_files_only=True)
        return self._config


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
    ep_size: Optional[PositiveInt] = Field(1, description="expert parallel size: each EP rank's files "
                                                          "(mp_rank_TT_PPP_EEE) hold num_experts / ep_size experts "
                                                          "of every MoE layer and a copy of the other tensors; must "
                                                          "divide num_experts (1 for a model without experts)")

    def tp(self, modules) -> dict[str, int]:
        """Module name -> TP size, by each module's ``tp_option`` (0 = ``tp_size``)."""
        return {m.name: getattr(self, m.tp_option) or self.tp_size for m in modules}

    def counts(self, modules, layers: dict[str, int]) -> dict[str, list[list[int]]]:
        """Module name -> layers per [chunk][stage], by each module's ``pp_option``."""
        llm = nested(self.llm_pp_layers)
        out = {}
        for m in modules:
            given = nested(getattr(self, m.pp_option))
            if given is None:  # MindSpeed-MM's optional lists (audio): all the module's layers on the first stage
                given = [[0] * len(chunk) for chunk in llm]
                given[0][0] = layers[m.name]
            out[m.name] = given
        return out

    def unused_options(self, modules) -> list[str]:
        """Options given for modules the model does not have, as 'option=value' strings."""
        claimed = {m.pp_option for m in modules} | {m.tp_option for m in modules} | {"tp_size"}
        return [f"{name}={getattr(self, name)}" for name in PP_OPTIONS + TP_OPTIONS
                if name not in claimed and getattr(self, name) not in (None, 0)]


class _Common(_Strict):
    mm_dir: Path = Field(description="Megatron checkpoint directory (MindSpeed-MM layout: release/ or iter_*/ "
                                     "with mp_rank_XX[_YYY]/model_optim_rng.pt)")
    hf_config: HfConfig = Field(description="the original Hugging Face checkpoint")
    dtype: Optional[Dtype] = Field(None, description="cast the converted model's weights to bf16/fp16/fp32 "
                                                     "(default: keep each tensor's dtype)")
    overwrite: bool = Field(False, description="replace a non-empty output directory")


class HfToMmConfig(_Common):
    parallel_config: ParallelConfig = Field(description="the layout to write")
    test_convert_precision: bool = Field(False, description="after converting, run transformers' model and ours on "
                                                            "the same tiny input and report the difference")


_LORA_LOAD_DIR = ("a LoRA run's adapter-only checkpoint (its --save); the source directory is then the base "
                  "checkpoint that run loaded (its --load)")


class MmToHfConfig(_Common):
    save_hf_dir: Path = Field(description="where the Hugging Face checkpoint is written (the model converted; "
                                          "other models' tensors, e.g. talker/token2wav, and all other files taken "
                                          "from hf_dir)")
    parallel_config: Optional[ParallelConfig] = Field(
        None, description="optional: the layout is read from the checkpoint; if given it must match")
    lora_alpha: Optional[float] = Field(None, description="LoRA alpha of a LoRA-trained checkpoint (default: the "
                                                          "training run's saved args); adapters are merged in")
    lora_r: Optional[PositiveInt] = Field(None, description="LoRA rank (default: the saved args)")
    lora_load_dir: Optional[Path] = Field(None, description=_LORA_LOAD_DIR + " (mm_dir)")
    save_lora_as_peft: bool = Field(False, description="write only the LoRA adapters, as a PEFT adapter directory "
                                                       "(adapter_config.json + adapter_model.safetensors) for "
                                                       "hf_dir's model (transformers' module names, e.g. "
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
