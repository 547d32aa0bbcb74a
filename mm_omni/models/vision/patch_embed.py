"""Patch embedding of the Qwen2.5-VL vision encoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class PatchEmbed(torch.nn.Module):
    """``[n_patches, C*T*P*P] -> [n_patches, hidden]``.

    The weight is a ``Conv3d`` (kernel = stride = one ``T x P x P`` patch, no bias) so the state
    dict matches transformers and MindSpeed-MM (``patch_embed.proj.weight``, [hidden, C, T, P, P]).
    Each input row is exactly one patch, so the convolution is a plain matmul; running it as
    ``F.linear`` skips the 5-D reshape and cuDNN's conv3d setup (same math, one GEMM).
    """

    def __init__(self, in_channels: int, temporal_patch_size: int, patch_size: int, hidden_size: int,
                 dtype: torch.dtype = torch.float32, bias: bool = False):
        super().__init__()
        kernel = (temporal_patch_size, patch_size, patch_size)
        # Qwen2.5-VL's convolution has no bias, Qwen3-VL's has one (``patch_embed.proj.bias``)
        self.proj = torch.nn.Conv3d(in_channels, hidden_size, kernel_size=kernel, stride=kernel,
                                    bias=bias, dtype=dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight.flatten(1)  # [hidden, C*T*P*P], the order of a patch row
        if pixel_values.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"pixel_values rows have {pixel_values.shape[-1]} values; this encoder expects "
                f"in_channels * temporal_patch_size * patch_size**2 = {weight.shape[1]}"
            )
        return F.linear(pixel_values.to(weight.dtype), weight, self.proj.bias)
