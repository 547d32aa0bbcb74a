"""pydantic schema of MindSpeed-MM's ``model.json`` for Qwen2.5-Omni.

A MindSpeed-MM ``model_7b.json`` loads as it is. Unknown keys are errors (a typo must not be
silently ignored). Sizes and special-token ids always come from here (or the HF config via
:func:`from_hf_thinker_config`), never from constants in code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PipelineLayers = Union[list[int], list[list[int]]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)


class _ModuleCommon(_Strict):
    """Keys MindSpeed-MM puts on every module; most only pick a MindSpeed kernel or dtype."""

    model_id: str
    num_layers: int = Field(ge=0)
    hidden_size: int = Field(gt=0)
    ffn_hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    gated_linear_unit: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    layernorm_epsilon: float = 1e-6
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    activation_func: Literal["silu", "gelu", "fast_gelu", "quick_gelu"] = "silu"
    fp16: bool = False
    bf16: bool = False
    params_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    freeze: bool = False
    use_fused_rotary_pos_emb: bool = False
    post_layer_norm: bool = False
    pipeline_num_layers: Optional[PipelineLayers] = None
    attention_mask_type: Optional[str] = None
    add_bias_linear: Optional[bool] = None
    bias_activation_fusion: Optional[bool] = None
    # recompute (MindSpeed-MM README: vit keys; any module here)
    recompute_granularity: Optional[Literal["full", "selective"]] = None
    recompute_method: Optional[Literal["uniform", "block"]] = None
    recompute_num_layers: Optional[int] = None

    def stage_layers(self) -> list[list[int]]:
        """``pipeline_num_layers`` as [vpp_chunk][pp_stage]; ``[[num_layers]]`` when unset."""
        layers = self.pipeline_num_layers
        if layers is None:
            return [[self.num_layers]]
        if layers and isinstance(layers[0], int):
            return [list(layers)]  # type: ignore[list-item]
        return [list(chunk) for chunk in layers]  # type: ignore[union-attr]

    @model_validator(mode="after")
    def _check_layer_split(self):
        if self.pipeline_num_layers is not None:
            chunks = self.stage_layers()
            if len({len(c) for c in chunks}) != 1:
                raise ValueError(
                    f"pipeline_num_layers={self.pipeline_num_layers}: every virtual-pipeline chunk "
                    "must list one count per pipeline stage (same length)"
                )
            total = sum(sum(c) for c in chunks)
            if total != self.num_layers:
                raise ValueError(
                    f"pipeline_num_layers={self.pipeline_num_layers} sums to {total} but "
                    f"num_layers is {self.num_layers}: make the per-stage counts add up to {self.num_layers}"
                )
        return self


class VisionEncoderConfig(_ModuleCommon):
    model_id: str = "qwen2vit"
    llm_hidden_size: int
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    intermediate_size: Optional[int] = None
    tokens_per_second: float = 2
    window_attn_size: int = 112
    fullatt_block_indexes: list[int] = Field(default_factory=list)
    rope_theta: float = 10000.0


class VisionProjectorConfig(_ModuleCommon):
    model_id: str = "lnmlp"
    num_layers: int = 1
    input_size: int


class AudioEncoderConfig(_ModuleCommon):
    model_id: str = "qwen_omni"
    # Whisper: LayerNorm (torch default eps) and GELU; MindSpeed-MM's model_7b.json omits the eps.
    normalization: Literal["RMSNorm", "LayerNorm"] = "LayerNorm"
    layernorm_epsilon: float = 1e-5
    activation_func: Literal["silu", "gelu", "fast_gelu", "quick_gelu"] = "gelu"
    d_model: int
    num_mel_bins: int = 128
    max_source_positions: int = 1500
    n_window: int = 100
    scale_embedding: bool = False
    output_dim: int


class TextDecoderConfig(_ModuleCommon):
    model_id: str = "qwen2_5_omni_thinker"
    seq_length: Optional[int] = None
    max_position_embeddings: int = 32768
    vocab_size: int
    rope_theta: float = 1000000.0
    untie_embeddings_and_output_weights: bool = True
    disable_bias_linear: bool = True
    init_method_std: float = 0.02
    position_embedding_type: Literal["mrope"] = "mrope"
    attention_softmax_in_fp32: bool = True
    parallel_output: bool = True
    group_query_attention: bool = True
    num_query_groups: int
    mrope_section: list[int] = Field(default_factory=lambda: [16, 24, 24])
    rope_scaling: Optional[dict[str, Any]] = None
    add_qkv_bias: bool = True
    tp: int = Field(default=1, ge=1)
    pp: int = Field(default=1, ge=1)
    cp: int = Field(default=1, ge=1)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads  # type: ignore[operator]


class _ParallelSizes(_Strict):
    tp: int = Field(default=1, ge=1)
    pp: int = Field(default=1, ge=1)
    cp: int = Field(default=1, ge=1)


class ImageEncoderBlock(_ParallelSizes):
    vision_encoder: VisionEncoderConfig
    vision_projector: VisionProjectorConfig


class AudioEncoderBlock(_ParallelSizes):
    audio_encoder: AudioEncoderConfig


class OmniModelConfig(_Strict):
    """The whole ``model.json``."""

    model_id: str = "qwen2_5vl"
    img_context_token_id: Optional[int] = None  # MindSpeed-MM's scatter marker; we use the ids below
    vision_start_token_id: int = 151652
    image_token_id: int = 151655
    video_token_id: int = 151656
    audio_token_id: int = 151646
    audio_start_token_id: int = 151647
    audio_end_token_id: int = 151648
    vision_end_token_id: int = 151653
    position_id_per_seconds: int = 25
    seconds_per_chunk: int = 2
    image_encoder: Optional[ImageEncoderBlock] = None
    audio_encoder: Optional[AudioEncoderBlock] = None
    text_decoder: TextDecoderConfig
    text_encoder: None = None
    video_encoder: None = None

    @model_validator(mode="after")
    def _check_stages(self):
        """Encoders must finish on a pipeline stage no later than the one where the decoder starts."""
        text_chunks = self.text_decoder.stage_layers() if self.text_decoder.pipeline_num_layers else None
        if text_chunks is None:
            return self
        for name, enc in (("image_encoder.vision_encoder", self.image_encoder and self.image_encoder.vision_encoder),
                          ("audio_encoder.audio_encoder", self.audio_encoder and self.audio_encoder.audio_encoder)):
            if enc is None or enc.pipeline_num_layers is None:
                continue
            enc_chunks = enc.stage_layers()
            if [len(c) for c in enc_chunks] != [len(c) for c in text_chunks]:
                raise ValueError(
                    f"{name}.pipeline_num_layers={enc.pipeline_num_layers} has a different number of "
                    f"stages than text_decoder.pipeline_num_layers={self.text_decoder.pipeline_num_layers}: "
                    "give every module one count per pipeline stage (zeros where it has no layers)"
                )
            flat_enc = [n for c in enc_chunks for n in c]
            flat_txt = [n for c in text_chunks for n in c]
            last_enc = max((i for i, n in enumerate(flat_enc) if n), default=-1)
            first_txt = min((i for i, n in enumerate(flat_txt) if n), default=len(flat_txt))
            if last_enc > first_txt:
                raise ValueError(
                    f"{name}.pipeline_num_layers={enc.pipeline_num_layers} still has layers on stage "
                    f"{last_enc} but the text decoder starts on stage {first_txt} "
                    f"(text_decoder.pipeline_num_layers={self.text_decoder.pipeline_num_layers}): "
                    "place all encoder layers on or before the decoder's first stage, e.g. [32,0,0,0] "
                    "with [1,10,10,7]"
                )
        return self


def load_model_config(path: Union[str, Path]) -> OmniModelConfig:
    """Read and validate a model.json; errors name the file, the field and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--mm-model {path}: no such file; pass the path of a model.json")
    try:
        return OmniModelConfig.model_validate(json.loads(path.read_text()))
    except ValidationError as err:
        raise ValueError(f"{path}: invalid model config:\n{err}") from None


def from_hf_thinker_config(thinker) -> OmniModelConfig:
    """Build the model.json for a transformers ``Qwen2_5OmniThinkerConfig`` (no parallel layout)."""
    text, vision, audio = thinker.text_config, thinker.vision_config, thinker.audio_config
    rope = getattr(text, "rope_parameters", None) or {}
    mrope_section = rope.get("mrope_section") or (getattr(text, "rope_scaling", None) or {}).get(
        "mrope_section", [16, 24, 24]
    )
    vision_rope = getattr(vision, "rope_parameters", None) or {}
    return OmniModelConfig(
        image_token_id=thinker.image_token_index,
        video_token_id=thinker.video_token_index,
        audio_token_id=thinker.audio_token_index,
        audio_start_token_id=thinker.audio_start_token_id,
        audio_end_token_id=thinker.audio_end_token_id,
        vision_start_token_id=getattr(thinker, "vision_start_token_id", 151652),
        vision_end_token_id=getattr(thinker, "vision_end_token_id", 151653),
        position_id_per_seconds=thinker.position_id_per_seconds,
        seconds_per_chunk=thinker.seconds_per_chunk,
        image_encoder=ImageEncoderBlock(
            vision_encoder=VisionEncoderConfig(
                num_layers=vision.depth,
                hidden_size=vision.hidden_size,
                ffn_hidden_size=vision.intermediate_size,
                intermediate_size=vision.intermediate_size,
                llm_hidden_size=vision.out_hidden_size,
                num_attention_heads=vision.num_heads,
                gated_linear_unit=True,
                add_bias_linear=True,
                in_channels=vision.in_channels,
                patch_size=vision.patch_size,
                spatial_merge_size=vision.spatial_merge_size,
                temporal_patch_size=vision.temporal_patch_size,
                tokens_per_second=getattr(vision, "tokens_per_second", 2),
                window_attn_size=vision.window_size,
                fullatt_block_indexes=list(vision.fullatt_block_indexes),
                activation_func=vision.hidden_act if vision.hidden_act in ("silu", "gelu") else "silu",
                rope_theta=vision_rope.get("rope_theta", 10000.0),
            ),
            vision_projector=VisionProjectorConfig(
                input_size=vision.hidden_size,
                hidden_size=vision.out_hidden_size,
                ffn_hidden_size=vision.hidden_size * vision.spatial_merge_size**2,
                gated_linear_unit=False,
                add_bias_linear=True,
                activation_func="gelu",
            ),
        ),
        audio_encoder=AudioEncoderBlock(
            audio_encoder=AudioEncoderConfig(
                num_layers=audio.encoder_layers,
                hidden_size=audio.d_model,
                d_model=audio.d_model,
                ffn_hidden_size=audio.encoder_ffn_dim,
                num_attention_heads=audio.encoder_attention_heads,
                normalization="LayerNorm",
                activation_func="gelu",
                add_bias_linear=True,
                layernorm_epsilon=1e-5,
                num_mel_bins=audio.num_mel_bins,
                max_source_positions=audio.max_source_positions,
                n_window=audio.n_window,
                scale_embedding=audio.scale_embedding,
                output_dim=audio.output_dim,
            )
        ),
        text_decoder=TextDecoderConfig(
            num_layers=text.num_hidden_layers,
            hidden_size=text.hidden_size,
            ffn_hidden_size=text.intermediate_size,
            num_attention_heads=text.num_attention_heads,
            num_query_groups=text.num_key_value_heads,
            vocab_size=text.vocab_size,
            max_position_embeddings=text.max_position_embeddings,
            rope_theta=rope.get("rope_theta", getattr(text, "rope_theta", 1000000.0)),
            mrope_section=list(mrope_section),
            # transformers ties the thinker's lm_head by the thinker's flag only (text_config's
            # defaults to True in transformers 5.23 and is ignored there)
            untie_embeddings_and_output_weights=not getattr(thinker, "tie_word_embeddings", False),
            layernorm_epsilon=text.rms_norm_eps,
            gated_linear_unit=True,
            add_bias_linear=False,
            add_qkv_bias=True,
            init_method_std=text.initializer_range,
        ),
    )
