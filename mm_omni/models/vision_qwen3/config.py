"""The module config of the Qwen3-VL-style vision encoder (model.json's ``vision_encoder`` keys for it).

The blocks are the shared ViT translation (:func:`mm_omni.models.vision.config.vision_transformer_config`):
MHA with q/k/v biases, here with LayerNorm and an ungated MLP with biases; the mergers are
``VisionProjectorConfig`` modules (LayerNorm, erf-GELU MLP).
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from mm_omni.config.model import ActivationName, _ModuleCommon


class Qwen3VisionEncoderConfig(_ModuleCommon):
    model_id: str = "qwen3vit"
    llm_hidden_size: int
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    intermediate_size: Optional[int] = None
    # learned positions: a square grid of int(sqrt(n)) ** 2 entries, resampled bilinearly to every image
    num_position_embeddings: int = Field(gt=0)
    # 0-based layers whose outputs go through their own (deepstack) merger, in this order of mergers
    deepstack_visual_indexes: list[int] = Field(default_factory=list)
    rope_theta: float = 10000.0
    normalization: Literal["RMSNorm", "LayerNorm"] = "LayerNorm"
    activation_func: ActivationName = "gelu_tanh"

    @model_validator(mode="after")
    def _check_deepstack(self):
        indexes = self.deepstack_visual_indexes
        outside = [i for i in indexes if not 0 <= i < self.num_layers]
        if outside:
            raise ValueError(f"deepstack_visual_indexes={indexes}: layers {outside} are not among the "
                             f"{self.num_layers} layers (0-based): use indexes in [0, {self.num_layers})")
        if len(set(indexes)) != len(indexes):
            raise ValueError(f"deepstack_visual_indexes={indexes} names a layer twice: list each layer once")
        return self

    @model_validator(mode="after")
    def _check_recompute(self):
        # the deepstack taps need every tapped layer's output with its graph; megatron's block recompute
        # runs the layers of a chunk without one
        if self.recompute_granularity is not None:
            raise ValueError(f"recompute_granularity={self.recompute_granularity!r}: not supported by the Qwen3 "
                             "vision encoder (activation recompute with deepstack taps is not implemented): remove it")
        return self
