"""Qwen2.5-VL's probe for ``--cfg.test_convert_precision``: one row with an image and a video.

Random pixels between text ids drawn from outside the special tokens; positions come from
:mod:`mm_omni.models.rope_index` and are given to both models, so the comparison is about the weights.
Compared: the vision encoder's features (image + video) and the logits.
"""

from __future__ import annotations

import torch

TEXT_IDS = 8  # text tokens before / between / after the media spans


def _special_ids(cfg) -> set[int]:
    """Every id the config gives a meaning to (media, their markers, pad/bos/eos of the text model)."""
    text = cfg.text_config
    ids = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id,
           text.pad_token_id, text.bos_token_id}
    eos = text.eos_token_id
    ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return {i for i in ids if isinstance(i, int)}


def probe_row(cfg, gen: torch.Generator) -> dict:
    """One row with an image and a video (one temporal group each), and its inputs."""
    from mm_omni.models.rope_index import get_rope_index

    vision = cfg.vision_config
    special = _special_ids(cfg)
    regular = torch.tensor([i for i in range(min(cfg.text_config.vocab_size, 4096)) if i not in special])

    def text(n: int) -> list[int]:
        return regular[torch.randint(0, len(regular), (n,), generator=gen)].tolist()

    merge = vision.spatial_merge_size
    grid = torch.tensor([[1, 2 * merge, 2 * merge]])  # one temporal group of 2*merge x 2*merge patches
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    n_patches = int(grid.prod())
    block = n_patches // merge**2
    ids = (text(TEXT_IDS) + [cfg.vision_start_token_id] + [cfg.image_token_id] * block + [cfg.vision_end_token_id]
           + text(TEXT_IDS) + [cfg.vision_start_token_id] + [cfg.video_token_id] * block
           + [cfg.vision_end_token_id] + text(TEXT_IDS))
    row = dict(input_ids=torch.tensor([ids]),
               pixel_values=torch.randn(n_patches, patch_dim, generator=gen), image_grid_thw=grid,
               pixel_values_videos=torch.randn(n_patches, patch_dim, generator=gen), video_grid_thw=grid.clone())
    row["position_ids"] = get_rope_index(
        ids, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id, audio_token_id=None,
        image_grid_thw=grid, video_grid_thw=grid, video_second_per_grid=[1.0], spatial_merge_size=merge,
        position_id_per_seconds=vision.tokens_per_second,
    ).unsqueeze(1)
    return row


def build_model(cfg):
    """Our OmniModel for the config (the converted checkpoint is loaded into it)."""
    from mm_omni.models.omni import OmniModel
    from mm_omni.models.qwen2_5_vl.hf_config import config_from_hf

    return OmniModel(config_from_hf(cfg))


def compare(hf, model, cfg, gen: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (ours, transformers')} on one probe row."""
    row = probe_row(cfg, gen)
    pixels = torch.cat([row["pixel_values"], row["pixel_values_videos"]])
    grids = torch.cat([row["image_grid_thw"], row["video_grid_thw"]])
    with torch.no_grad():
        return {
            "vision encoder (image + video)": (
                model.image_encoder(pixels, grids),
                torch.cat(hf.model.get_image_features(pixels, grids, return_dict=True).pooler_output)),
            "logits (text + image + video)": (model(**row, return_logits=True).logits, hf(**row).logits),
        }
