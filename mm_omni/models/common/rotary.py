"""Rotary tables shared by the vision encoder (2D RoPE) and the text decoder (M-RoPE).

Both return megatron-core's per-token ``freqs`` layout ``[s, b, 1, head_dim]`` (angles, not
cos/sin), which ``SelfAttention`` applies with ``rotate_half`` exactly as transformers does.
"""

from __future__ import annotations

import torch


def inv_freq(dim: int, theta: float, device=None) -> torch.Tensor:
    """``1 / theta^(2i/dim)`` for i in [0, dim/2), in fp32."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def vision_rotary_freqs(pos_hw: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Qwen2.5-VL 2D RoPE: ``pos_hw`` [s, 2] (row, col) -> freqs [s, 1, 1, head_dim].

    Half the rotary dims encode the row, half the column; the angle vector is duplicated
    (``cat(f, f)``) as in transformers' ``rotate_half`` convention.
    """
    freq = inv_freq(head_dim // 2, theta, pos_hw.device)  # [head_dim / 4]
    angles = (pos_hw.float()[..., None] * freq).flatten(1)  # [s, head_dim / 2]
    return torch.cat([angles, angles], dim=-1)[:, None, None, :]


def mrope_freqs(
    position_ids: torch.Tensor, head_dim: int, mrope_section: list[int], theta: float
) -> torch.Tensor:
    """M-RoPE: 3D ``position_ids`` [3, b, s] (temporal, height, width) -> freqs [s, b, 1, head_dim].

    The head_dim/2 frequencies are split into ``mrope_section`` chunks taken from the temporal,
    height and width positions in turn, then duplicated (``cat(f, f)``).
    """
    if sum(mrope_section) * 2 != head_dim:
        raise ValueError(
            f"mrope_section={mrope_section} sums to {sum(mrope_section)}; it must be head_dim/2 = {head_dim // 2}"
        )
    freq = inv_freq(head_dim, theta, position_ids.device)  # [head_dim / 2]
    angles = position_ids.float()[..., None] * freq  # [3, b, s, head_dim / 2]
    parts = angles.split(list(mrope_section), dim=-1)
    picked = torch.cat([part[i % 3] for i, part in enumerate(parts)], dim=-1)  # [b, s, head_dim / 2]
    emb = torch.cat([picked, picked], dim=-1)
    return emb.transpose(0, 1)[:, :, None, :].contiguous()


def interleaved_mrope_freqs(
    position_ids: torch.Tensor, head_dim: int, mrope_section: list[int], theta: float
) -> torch.Tensor:
    """Interleaved M-RoPE (Qwen3-VL / Qwen3-Omni): 3D ``position_ids`` [3, b, s] -> freqs [s, b, 1, head_dim].

    Frequency i of the head_dim/2 takes the height position when ``i % 3 == 1`` and
    ``i < 3 * mrope_section[1]``, the width position when ``i % 3 == 2`` and ``i < 3 * mrope_section[2]``,
    the temporal position otherwise; so every axis spans low and high frequencies, where
    :func:`mrope_freqs` gives each axis one contiguous band. Positions may be fractional (kept as
    floats, as transformers does).
    """
    if sum(mrope_section) * 2 != head_dim:
        raise ValueError(
            f"mrope_section={mrope_section} sums to {sum(mrope_section)}; it must be head_dim/2 = {head_dim // 2}"
        )
    freq = inv_freq(head_dim, theta, position_ids.device)  # [head_dim / 2]
    angles = position_ids.float()[..., None] * freq  # [3, b, s, head_dim / 2]
    i = torch.arange(head_dim // 2, device=position_ids.device)
    axis = torch.zeros_like(i)
    for a in (1, 2):
        axis = torch.where((i % 3 == a) & (i < 3 * mrope_section[a]), a, axis)
    picked = angles.gather(0, axis.expand_as(angles[:1]))[0]  # [b, s, head_dim / 2]
    emb = torch.cat([picked, picked], dim=-1)
    return emb.transpose(0, 1)[:, :, None, :].contiguous()
