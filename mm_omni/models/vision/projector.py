"""Qwen2.5-VL patch merger: RMSNorm per patch, then an MLP over each ``m x m`` merge block.

State-dict names follow MindSpeed-MM's ``lnmlp`` projector: ``layernorm.weight`` and
``encoder.linear_fc{1,2}.{weight,bias}`` (a megatron-core ``MLP``: column-parallel fc1, GELU,
row-parallel fc2).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from mm_omni.config.model import VisionProjectorConfig
from mm_omni.models.common.layer_spec import mlp_spec
from mm_omni.models.vision.config import projector_transformer_config


class PatchMerger(MegatronModule):
    """``[n_patches, input_size] -> [n_patches / m^2, hidden_size]`` (patches already in merge-block order).

    ``norm_merged``: normalise each merged ``input_size * m^2`` vector instead of each patch (Qwen3-VL's
    deepstack mergers, transformers' ``use_postshuffle_norm``).
    """

    def __init__(self, cfg: VisionProjectorConfig, spatial_merge_size: int, tp_group=None, norm_merged: bool = False):
        config = projector_transformer_config(cfg, spatial_merge_size)
        super().__init__(config=config)
        self.merged_size = cfg.input_size * spatial_merge_size**2
        self.norm_merged = norm_merged
        self.layernorm = WrappedTorchNorm(config, self.merged_size if norm_merged else cfg.input_size,
                                          eps=cfg.layernorm_epsilon)
        self.encoder = MLP(config, mlp_spec().submodules, input_size=self.merged_size,
                           ffn_hidden_size=config.ffn_hidden_size, tp_group=tp_group)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.norm_merged:
            merged = self.layernorm(hidden.reshape(-1, 1, self.merged_size))
        else:
            merged = self.layernorm(hidden).reshape(-1, 1, self.merged_size)  # [s, b=1, h*m^2] for megatron
        out, bias = self.encoder(merged)
        if bias is not None:  # megatron's row-parallel fc2 hands its bias back unadded
            out = out + bias
        return out[:, 0]
