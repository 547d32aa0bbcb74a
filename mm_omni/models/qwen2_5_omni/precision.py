"""Qwen2.5-Omni's probe for ``--cfg.test_convert_precision``: one row with every modality of the thinker.

An image, an audio clip and a video (random pixels / mel features) between text ids drawn from outside
the special tokens; positions come from :mod:`mm_omni.models.rope_index` and are given to both models,
so the comparison is about the weights. Compared per module: the vision encoder's features (images and
video), the audio encoder's, and the logits.
"""

from __future__ import annotations

import torch

TEXT_IDS = 8  # text tokens before / between / after the media spans


def _special_ids(thinker) -> set[int]:
    """Every id the thinker config gives a meaning to (media, their markers, pad/bos/eos of the text model)."""
    names = ("image_token_index", "video_token_index", "audio_token_index", "audio_start_token_id",
             "audio_end_token_id", "vision_start_token_id", "vision_end_token_id", "user_token_id")
    ids = {getattr(thinker, n, None) for n in names}
    text = thinker.text_config
    ids |= {getattr(text, n, None) for n in ("pad_token_id", "bos_token_id", "eos_token_id")}
    return {i for i in ids if isinstance(i, int)}


def probe_row(thinker, gen: torch.Generator) -> dict:
    """One row with an image, an audio clip and a video (random pixels / mel features), and its inputs."""
    from mm_omni.models.rope_index import audio_token_count, get_rope_index

    vision, audio = thinker.vision_config, thinker.audio_config
    special = _special_ids(thinker)
    regular = torch.tensor([i for i in range(min(thinker.text_config.vocab_size, 4096)) if i not in special])

    def text(n: int) -> list[int]:
        return regular[torch.randint(0, len(regular), (n,), generator=gen)].tolist()

    def marker(name: str) -> list[int]:
        value = getattr(thinker, name, None)
        return [value] if isinstance(value, int) else text(1)  # any one token: positions treat it as the marker

    merge = vision.spatial_merge_size
    grid = torch.tensor([[1, 2 * merge, 2 * merge]])  # one temporal group of 2*merge x 2*merge patches
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    n_patches = int(grid.prod())
    n_vision_tokens = n_patches // merge**2
    mel_frames = 100  # one second of audio
    n_audio_tokens = audio_token_count(mel_frames)
    ids = (text(TEXT_IDS) + marker("vision_start_token_id") + [thinker.image_token_index] * n_vision_tokens
           + marker("vision_end_token_id") + text(TEXT_IDS) + marker("audio_start_token_id")
           + [thinker.audio_token_index] * n_audio_tokens + marker("audio_end_token_id") + text(TEXT_IDS)
           + marker("vision_start_token_id") + [thinker.video_token_index] * n_vision_tokens
           + marker("vision_end_token_id") + text(TEXT_IDS))
    row = dict(
        input_ids=torch.tensor([ids]),
        pixel_values=torch.randn(n_patches, patch_dim, generator=gen),
        image_grid_thw=grid,
        pixel_values_videos=torch.randn(n_patches, patch_dim, generator=gen),
        video_grid_thw=grid.clone(),
        input_features=torch.randn(1, audio.num_mel_bins, mel_frames, generator=gen),
        feature_attention_mask=torch.ones(1, mel_frames, dtype=torch.long),
    )
    row["position_ids"] = get_rope_index(
        ids, image_token_id=thinker.image_token_index, video_token_id=thinker.video_token_index,
        audio_token_id=thinker.audio_token_index, image_grid_thw=grid, video_grid_thw=grid,
        video_second_per_grid=[1.0], audio_seqlens=[mel_frames], spatial_merge_size=merge,
        position_id_per_seconds=thinker.position_id_per_seconds, seconds_per_chunk=thinker.seconds_per_chunk,
    ).unsqueeze(1)
    return row


def build_model(thinker):
    """Our OmniModel for the thinker config (the converted checkpoint is loaded into it)."""
    from mm_omni.models.omni import OmniModel
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config

    return OmniModel(from_hf_thinker_config(thinker))


def compare(hf, model, thinker, gen: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (ours, transformers')} on one probe row."""
    row = probe_row(thinker, gen)
    pixels = torch.cat([row["pixel_values"], row["pixel_values_videos"]])
    grids = torch.cat([row["image_grid_thw"], row["video_grid_thw"]])
    return {
        "vision encoder (image + video)": (
            model.image_encoder(pixels, grids),
            torch.cat(hf.get_image_features(pixels, grids, return_dict=True).pooler_output)),
        "audio encoder": (
            model.audio_encoder(row["input_features"], row["feature_attention_mask"].sum(-1)),
            hf.get_audio_features(row["input_features"], row["feature_attention_mask"],
                                  return_dict=True).last_hidden_state),
        "logits (text + image + audio + video)": (model(**row, return_logits=True).logits, hf(**row).logits),
    }
