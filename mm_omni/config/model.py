"""pydantic schema of MindSpeed-MM's ``model.json``: image/audio encoders and a text decoder.

The families built of these stacks (Qwen2.5-Omni, Qwen2.5-VL) share it; each family's folder says which
blocks it needs and builds the object from an HF config. A MindSpeed-MM ``model_*.json`` loads as it is.
Unknown keys are errors (a typo must not be silently ignored). Sizes always come from here (or the HF
config through the family's adapter),
never from constants in code; special-token ids come from here or, where model.json omits them, from the
tokenizer at start-up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PipelineLayers = Union[list[int], list[list[int]]]
# MindSpeed-MM's activation names plus "gelu_tanh" (the tanh-approximated GELU, transformers'
# "gelu_pytorch_tanh"); "fast_gelu" is the same approximation in megatron's formula, "gelu" the exact (erf) one.
ActivationName = Literal["silu", "gelu", "gelu_tanh", "fast_gelu", "quick_gelu"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)


class _ModuleCommon(_Strict):
    """Keys MindSpeed-MM puts on every module; most only pick a MindSpeed kernel or dtype."""

    model_id: str
    num_layers: int = Field(ge=0)
    hidden_size: int = Field(gt=0)
    ffn_hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    gated_linear_unit: bool = False  # MLP: act(gate) * up when true, act(fc1) otherwise
    hidden_dropout: float = Field(default=0.0, ge=0.0, le=1.0)
    attention_dropout: float = Field(default=0.0, ge=0.0, le=1.0)  # on the attention probabilities, training only
    layernorm_epsilon: float = 1e-6
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    activation_func: ActivationName = "silu"
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
    def _check_activation_fusion(self):
        if self.bias_activation_fusion and not (self.gated_linear_unit and self.activation_func == "silu"):
            raise ValueError(
                f"bias_activation_fusion=true with activation_func={self.activation_func!r} and gated_linear_unit="
                f"{self.gated_linear_unit}: not supported (only the gated SiLU is fused; megatron's fused GELU is "
                "the tanh approximation): set bias_activation_fusion to false or remove it"
            )
        return self

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
    activation_func: ActivationName = "gelu"
    d_model: int
    num_mel_bins: int = 128
    max_source_positions: int = 1500
    n_window: int = 100
    scale_embedding: bool = False
    output_dim: int

    @model_validator(mode="after")
    def _check_scale_embedding(self):
        if self.scale_embedding:
            raise ValueError("scale_embedding=true: not supported (transformers' Qwen2.5-Omni audio encoder never "
                             "applies the scale, nor does ours): set it to false")
        return self


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
    # transformers' embedding padding_idx: the row of this token id gets no gradient from the lookups
    pad_token_id: Optional[int] = None
    # MindSpeed-MM's switch to unpad rows for its varlen flash kernel: the math is the same either way (padding
    # never reaches a real token's attention here), so it is accepted and changes nothing
    use_remove_padding: Optional[bool] = None
    # Qwen3-style blocks (megatron's names): a head size of its own (unset: hidden_size / num_attention_heads),
    # an RMSNorm over each query and key head before the rotary, and M-RoPE with interleaved frequencies
    # (frequency i from the height positions when i % 3 == 1, the width ones when i % 3 == 2, within
    # 3 * mrope_section of that axis; the temporal ones elsewhere) instead of contiguous sections
    kv_channels: Optional[int] = Field(default=None, gt=0)
    qk_layernorm: bool = False
    mrope_interleaved: bool = False
    # mixture of experts (megatron's names); num_moe_experts unset = a dense MLP in every layer.
    # moe_layer_freq: k = every k-th layer from layer 0 is MoE, or a 0/1 list with one entry per layer.
    # moe_router_pre_softmax false: softmax over the top-k logits (= transformers' norm_topk_prob true).
    # moe_aux_loss_coeff scales megatron's per-layer load-balancing loss (mm_omni.models.text.moe).
    num_moe_experts: Optional[int] = Field(default=None, gt=0)
    moe_router_topk: int = Field(default=2, gt=0)
    moe_ffn_hidden_size: Optional[int] = Field(default=None, gt=0)
    moe_layer_freq: Union[int, list[int]] = 1
    moe_router_pre_softmax: bool = False
    moe_aux_loss_coeff: float = Field(default=0.0, ge=0.0)
    moe_token_dispatcher_type: Literal["allgather", "alltoall"] = "allgather"
    tp: int = Field(default=1, ge=1)
    pp: int = Field(default=1, ge=1)
    cp: int = Field(default=1, ge=1)

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads  # type: ignore[operator]

    @model_validator(mode="after")
    def _check_moe(self):
        freq = self.moe_layer_freq
        if isinstance(freq, int) and freq < 1:
            raise ValueError(f"moe_layer_freq={freq}: use k >= 1 (every k-th layer) or a 0/1 list per layer")
        if isinstance(freq, list) and (len(freq) != self.num_layers or set(freq) - {0, 1}):
            raise ValueError(f"moe_layer_freq={freq}: a list needs one 0/1 entry per layer ({self.num_layers})")
        if self.num_moe_experts is None:
            return self
        if self.moe_router_topk > self.num_moe_experts:
            raise ValueError(f"moe_router_topk={self.moe_router_topk} exceeds num_moe_experts="
                             f"{self.num_moe_experts}: route each token to at most num_moe_experts experts")
        if self.moe_ffn_hidden_size is None:
            raise ValueError(f"num_moe_experts={self.num_moe_experts} but moe_ffn_hidden_size is unset: set the "
                             "experts' intermediate width (transformers' moe_intermediate_size)")
        if not self.gated_linear_unit:
            raise ValueError("num_moe_experts is set with gated_linear_unit=false: the experts implemented are "
                             "gated MLPs (act(gate) * up); set gated_linear_unit=true")
        return self

    @model_validator(mode="after")
    def _check_rope(self):
        """M-RoPE without scaling is what the decoder implements; anything else would be silently ignored."""
        scaling = self.rope_scaling or {}
        for key in ("type", "rope_type"):
            if scaling.get(key) not in (None, "default", "mrope"):
                raise ValueError(f"rope_scaling={scaling}: {key} {scaling[key]!r} not supported (only M-RoPE "
                                 "without scaling is implemented): remove rope_scaling or set its type to 'mrope'")
        unknown = sorted(set(scaling) - {"type", "rope_type", "mrope_section"})
        if unknown:
            raise ValueError(f"rope_scaling={scaling}: keys {unknown} not supported (M-RoPE without scaling reads "
                             "only type and mrope_section): remove them")
        if "mrope_section" in scaling and list(scaling["mrope_section"]) != self.mrope_section:
            raise ValueError(f"rope_scaling.mrope_section={scaling['mrope_section']} but mrope_section="
                             f"{self.mrope_section}: the decoder uses mrope_section; make them equal")
        if self.num_attention_heads and sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(f"mrope_section={self.mrope_section} sums to {sum(self.mrope_section)} but head_dim / 2 "
                             f"is {self.head_dim // 2} (kv_channels {self.kv_channels}, hidden_size {self.hidden_size}, "
                             f"num_attention_heads {self.num_attention_heads}): make the sections add up to "
                             f"{self.head_dim // 2}")
        return self

    @model_validator(mode="after")
    def _check_pad_token_id(self):
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id={self.pad_token_id} is outside the vocabulary [0, {self.vocab_size}): "
                             "use an id of the vocabulary or null")
        return self


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
    # MindSpeed-MM's scatter marker (its <|IMAGE|> or <|VIDEO|> id): we scatter each modality at its own
    # id below, so it is only checked to be one of the two.
    img_context_token_id: Optional[int] = None
    # Special token ids: null (or absent) = read from the tokenizer at start-up (:meth:`with_tokenizer_ids`);
    # a stated id must equal the tokenizer's. Never defaulted to one checkpoint's ids.
    vision_start_token_id: Optional[int] = None
    image_token_id: Optional[int] = None
    video_token_id: Optional[int] = None
    audio_token_id: Optional[int] = None
    audio_start_token_id: Optional[int] = None
    audio_end_token_id: Optional[int] = None
    vision_end_token_id: Optional[int] = None
    position_id_per_seconds: int = 25
    seconds_per_chunk: int = 2
    image_encoder: Optional[ImageEncoderBlock] = None
    audio_encoder: Optional[AudioEncoderBlock] = None
    text_decoder: TextDecoderConfig
    text_encoder: None = None
    video_encoder: None = None
    # MindSpeed-MM's monkey-patch switches (e.g. {"bridge_patch": false}): they select its code paths, not the math
    patch: Optional[dict[str, Any]] = None

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


    def with_tokenizer_ids(self, tokenizer_ids: dict[str, int], source: str) -> "OmniModelConfig":
        """This config with every omitted special token id taken from ``tokenizer_ids`` (field -> id).

        A stated id that differs from the tokenizer's is an error naming both: the model would scatter media
        features at positions the data pipeline never fills.
        """
        filled = {}
        for field in SPECIAL_TOKEN_FIELDS:
            stated, actual = getattr(self, field), tokenizer_ids.get(field)
            if actual is None:
                continue  # the family's tokenizer has no such token (Qwen2.5-VL: no audio tokens)
            if stated is None:
                filled[field] = actual
            elif stated != actual:
                raise ValueError(
                    f"model.json {field}={stated} but the tokenizer ({source}) gives {actual} for "
                    f"{SPECIAL_TOKEN_FIELDS[field]}: remove {field} from model.json (it is then read from the "
                    "tokenizer) or point preprocess_parameters.model_name_or_path at the matching tokenizer"
                )
        marker = self.img_context_token_id
        media = (tokenizer_ids["image_token_id"], tokenizer_ids["video_token_id"])
        if marker is not None and marker not in media:
            raise ValueError(
                f"model.json img_context_token_id={marker} is neither the tokenizer's image placeholder id {media[0]} "
                f"nor its video placeholder id {media[1]} ({source}): remove it (each modality is placed at its own id)"
            )
        return self.model_copy(update=filled)

    def require_token_ids(self, *fields: str) -> None:
        """Raise if any of ``fields`` (default: all special token ids) is still unset."""
        missing = [f for f in (fields or SPECIAL_TOKEN_FIELDS) if getattr(self, f) is None]
        if missing:
            raise ValueError(
                f"model.json leaves {', '.join(missing)} unset and no tokenizer filled them: pass --mm-data "
                "(its preprocess_parameters.model_name_or_path names the tokenizer the ids are read from) or "
                "state the ids in model.json"
            )


# Special token ids of model.json -> the token whose id it is (for messages).
SPECIAL_TOKEN_FIELDS = {
    "image_token_id": "the image placeholder", "video_token_id": "the video placeholder",
    "audio_token_id": "the audio placeholder", "vision_start_token_id": "the vision start marker",
    "vision_end_token_id": "the vision end marker", "audio_start_token_id": "the audio start marker",
    "audio_end_token_id": "the audio end marker",
}


def load_model_config(path: Union[str, Path]) -> OmniModelConfig:
    """Read and validate a model.json; errors name the file, the field and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--mm-model {path}: no such file; pass the path of a model.json")
    try:
        return OmniModelConfig.model_validate(json.loads(path.read_text()))
    except ValidationError as err:
        raise ValueError(f"{path}: invalid model config:\n{err}") from None
