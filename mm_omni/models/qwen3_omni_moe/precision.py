"""Qwen3-Omni's probe for ``--cfg.test_convert_precision``: one row with every modality of the thinker.

An image, an audio clip and a video (random pixels / mel features) between text ids drawn from outside the
special tokens. Both models get transformers' ``get_rope_index`` positions, so the comparison is about the
weights. Compared per module: the vision encoder's merged features and each deepstack merger's (images and
video), the audio encoder's features, and the logits.
"""

from __future__ import annotations

import torch

TEXT_IDS = 8  # text tokens before / between / after the media spans
MARKERS = ("vision_start_token_id", "vision_end_token_id", "audio_start_token_id", "audio_end_token_id")


def _special_ids(thinker) -> set[int]:
    """Every id the thinker config gives a meaning to (media, their markers, pad/bos/eos of the text model)."""
    names = ("image_token_id", "video_token_id", "audio_token_id", "user_token_id") + MARKERS
    ids = {getattr(thinker, n, None) for n in names}
    text = thinker.text_config
    ids |= {getattr(text, n, None) for n in ("pad_token_id", "bos_token_id", "eos_token_id")}
    return {i for i in ids if isinstance(i, int)}


def probe_row(hf, thinker, gen: torch.Generator) -> dict:
    """One row with an image, an audio clip and a video, and its inputs (positions by transformers)."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    vision, audio = thinker.vision_config, thinker.audio_config
    special = _special_ids(thinker)
    regular = torch.tensor([i for i in range(min(thinker.text_config.vocab_size, 4096)) if i not in special])

    def text(n: int) -> list[int]:
        return regular[torch.randint(0, len(regular), (n,), generator=gen)].tolist()

    # config.json need not state the markers (vision_start_token_id is no declared field), but transformers'
    # get_rope_index reads the vision start from the config: give the model the one this probe uses
    marker = {name: getattr(thinker, name, None) for name in MARKERS}
    for name, value in marker.items():
        if not isinstance(value, int):
            marker[name] = text(1)[0]
            setattr(hf.config, name, marker[name])
    merge = vision.spatial_merge_size
    grid = torch.tensor([[1, 2 * merge, 2 * merge]])  # one temporal group of 2*merge x 2*merge patches
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    n_patches = int(grid.prod())
    n_vision_tokens = n_patches // merge**2
    mel_frames = 100  # one second of audio
    n_audio_tokens = int(_get_feat_extract_output_lengths(torch.tensor(mel_frames), audio.n_window))
    ids = (text(TEXT_IDS) + [marker["vision_start_token_id"]] + [thinker.image_token_id] * n_vision_tokens
           + [marker["vision_end_token_id"]] + text(TEXT_IDS) + [marker["audio_start_token_id"]]
           + [thinker.audio_token_id] * n_audio_tokens + [marker["audio_end_token_id"]] + text(TEXT_IDS)
           + [marker["vision_start_token_id"]] + [thinker.video_token_id] * n_vision_tokens
           + [marker["vision_end_token_id"]] + text(TEXT_IDS))
    row = dict(
        input_ids=torch.tensor([ids]),
        pixel_values=torch.randn(n_patches, patch_dim, generator=gen),
        image_grid_thw=grid,
        pixel_values_videos=torch.randn(n_patches, patch_dim, generator=gen),
        video_grid_thw=grid.clone(),
        input_features=torch.randn(1, audio.num_mel_bins, mel_frames, generator=gen),
        feature_attention_mask=torch.ones(1, mel_frames, dtype=torch.long),
    )
    row["position_ids"] = hf.model.get_rope_index(
        row["input_ids"], grid, grid, torch.ones_like(row["input_ids"]), False, torch.tensor([mel_frames]),
        torch.tensor([1.0]))[0]
    return row


def build_model(thinker):
    """Our Qwen3OmniModel for the thinker config (the converted checkpoint is loaded into it)."""
    from mm_omni.models.qwen3_omni_moe.hf_config import from_hf_thinker_config
    from mm_omni.models.qwen3_omni_moe.model import Qwen3OmniModel

    return Qwen3OmniModel(from_hf_thinker_config(thinker))


def compare(hf, model, thinker, gen: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (ours, transformers')} on one probe row."""
    row = probe_row(hf, thinker, gen)
    pixels = torch.cat([row["pixel_values"], row["pixel_values_videos"]])
    grids = torch.cat([row["image_grid_thw"], row["video_grid_thw"]])
    merged, deepstack = model.image_encoder.features(pixels, grids)
    theirs = hf.get_image_features(pixels, grids, return_dict=True)
    out = {"vision encoder (image + video)": (merged, torch.cat(theirs.pooler_output))}
    for k, (ours, ref) in enumerate(zip(deepstack, theirs.deepstack_features, strict=True)):
        out[f"deepstack merger {k}"] = (ours, torch.cat(ref))
    out["audio encoder"] = (
        model.audio_encoder(row["input_features"], row["feature_attention_mask"].sum(-1)),
        hf.get_audio_features(row["input_features"], row["feature_attention_mask"], return_dict=True).last_hidden_state)
    out["logits (text + image + audio + video)"] = (model(**row, return_logits=True).logits, hf(**row).logits)
    return out
