"""Whole Qwen2.5-VL vs transformers' ``Qwen2_5_VLForConditionalGeneration``: fp32 CPU, rel err < 1e-5.

One right-padded batch of four rows: an image; a video (two temporal groups); a larger image and a second
video of four groups at half-second grids; text only. Placeholder counts are built by hand (t*h*w/merge^2).
Both models get the same M-RoPE positions (ours, :mod:`mm_omni.models.rope_index`; how they compare with
transformers' own is tests/parity/test_qwen2_5_vl_positions.py), so what is compared is the model. Weights
go from transformers to ours through the converter's table (:mod:`mm_omni.models.qwen2_5_vl.convert`);
logits, loss and every parameter's gradient are compared, untied (7B and larger) and tied (3B).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.fixtures.qwen2_5_vl import TINY_VL_TOKEN_IDS, tiny_vl_config
from tests.helpers import init_megatron, randomize_, rel_err

TOL = 1e-5
IMG, VID = TINY_VL_TOKEN_IDS["image_token_id"], TINY_VL_TOKEN_IDS["video_token_id"]
VS, VE = TINY_VL_TOKEN_IDS["vision_start_token_id"], TINY_VL_TOKEN_IDS["vision_end_token_id"]
IMAGE_GRIDS = [[1, 4, 6], [1, 8, 8]]
VIDEO_GRIDS = [[2, 4, 4], [4, 4, 4]]
SECONDS_PER_GRID = [1.0, 0.5]
MODEL_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "pixel_values_videos",
              "video_grid_thw")


def vision_tokens(grid, merge: int = 2) -> int:
    return int(np.prod(grid)) // merge**2


def build_rows(gen: torch.Generator):
    def text(n):
        return torch.randint(0, 1000, (n,), generator=gen).tolist()

    def block(token, grid):
        return [VS] + [token] * vision_tokens(grid) + [VE]

    rows = [
        text(4) + block(IMG, IMAGE_GRIDS[0]) + text(3),
        text(3) + block(VID, VIDEO_GRIDS[0]) + text(4),
        text(2) + block(IMG, IMAGE_GRIDS[1]) + text(2) + block(VID, VIDEO_GRIDS[1]) + text(3),
        text(10),
    ]
    media = [([0], []), ([], [0]), ([1], [1]), ([], [])]  # per row: image indices, video indices
    return rows, media


def make_batch(cfg, seed: int = 3, plant: int | None = None) -> dict:
    """Padded tensors for both models plus per-row media bookkeeping; ``plant``: a text id written over every
    third text token (to make sure a given id, e.g. the pad id, occurs in the rows)."""
    gen = torch.Generator().manual_seed(seed)
    rows, media = build_rows(gen)
    if plant is not None:
        rows = [[plant if k % 3 == 1 and t < 1000 else t for k, t in enumerate(r)] for r in rows]
    b, s = len(rows), max(map(len, rows))
    ids = torch.zeros(b, s, dtype=torch.long)
    mask = torch.zeros(b, s, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    labels = torch.where((ids < 1000) & mask.bool(), ids, -100)
    labels[:, 0] = -100
    v = cfg.vision_config
    width = v.in_channels * v.temporal_patch_size * v.patch_size**2

    def pixels(grids):
        return torch.randn(sum(int(np.prod(g)) for g in grids), width, generator=gen)

    return dict(input_ids=ids, attention_mask=mask, labels=labels,
                pixel_values=pixels(IMAGE_GRIDS), image_grid_thw=torch.tensor(IMAGE_GRIDS),
                pixel_values_videos=pixels(VIDEO_GRIDS), video_grid_thw=torch.tensor(VIDEO_GRIDS),
                rows=rows, media=media)


def positions(cfg, batch) -> torch.Tensor:
    """Our ``get_rope_index`` per unpadded row (the template's call), padded with 1 like transformers."""
    from mm_omni.models.rope_index import get_rope_index

    ids = batch["input_ids"]
    pos = torch.ones(3, *ids.shape, dtype=torch.long)
    for i, (row, (imgs, vids)) in enumerate(zip(batch["rows"], batch["media"])):
        pos[:, i, :len(row)] = get_rope_index(
            row, image_token_id=IMG, video_token_id=VID, audio_token_id=None,
            image_grid_thw=torch.tensor([IMAGE_GRIDS[k] for k in imgs]) if imgs else None,
            video_grid_thw=torch.tensor([VIDEO_GRIDS[k] for k in vids]) if vids else None,
            video_second_per_grid=[SECONDS_PER_GRID[k] for k in vids],
            spatial_merge_size=cfg.vision_config.spatial_merge_size,
            position_id_per_seconds=cfg.vision_config.tokens_per_second)
    return pos


def build_hf(cfg, seed: int = 0):
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    hf = Qwen2_5_VLForConditionalGeneration(cfg).float().eval()
    randomize_(hf, seed + 1)
    return hf


def hf_to_mm(state: dict, cfg) -> dict:
    """transformers' names (either spelling) -> ours, through the converter's table."""
    from converters.common.convert import hf_state_to_mm
    from mm_omni.models.qwen2_5_vl.convert import SPEC

    return hf_state_to_mm(SPEC, cfg, state)


def build_mm(cfg, **kwargs):
    from mm_omni.models.omni import OmniModel
    from mm_omni.models.qwen2_5_vl.hf_config import config_from_hf

    mm_cfg = config_from_hf(cfg)
    return mm_cfg, OmniModel(mm_cfg, **kwargs)


def load_mm(model, state: dict) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("._extra_state") for k in missing), missing


def run_hf(hf, batch, pos):
    hf.zero_grad(set_to_none=True)
    out = hf(position_ids=pos, **{k: batch[k] for k in MODEL_KEYS})
    out.loss.backward()
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in hf.named_parameters()}
    return out.logits.detach(), out.loss.detach(), grads


def run_mm(model, batch, pos):
    model.zero_grad(set_to_none=True)
    out = model(position_ids=pos, return_logits=True, **{k: batch[k] for k in MODEL_KEYS})
    out.loss.backward()
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in model.named_parameters()}
    return out.logits.detach(), out.loss.detach(), grads


def parity_run(tied: bool, plant: int | None = None, **overrides):
    """Both models on :func:`make_batch`: (cfg, model.json, ours, batch, positions, hf (logits, loss, grads),
    ours (logits, loss, grads)); ``overrides`` go to :func:`tiny_vl_config`."""
    init_megatron()
    cfg = tiny_vl_config(tie_word_embeddings=tied, **overrides)
    hf = build_hf(cfg)
    mm_cfg, model = build_mm(cfg)
    load_mm(model, hf_to_mm(hf.state_dict(), cfg))
    batch = make_batch(cfg, plant=plant)
    pos = positions(cfg, batch)
    return cfg, mm_cfg, model, batch, pos, run_hf(hf, batch, pos), run_mm(model, batch, pos)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def parity(request):
    return parity_run(request.param)


def test_model_json_is_qwen2_5_vl(parity):
    from mm_omni.registry import for_model_json

    cfg, mm_cfg, model, *_ = parity
    assert mm_cfg.audio_encoder is None and model.audio_encoder is None
    assert (mm_cfg.model_id, mm_cfg.text_decoder.model_id) == ("qwen2_5vl", "qwen2_5_lm")
    assert for_model_json(mm_cfg.model_dump()).name == "qwen2_5_vl"
    assert mm_cfg.text_decoder.untie_embeddings_and_output_weights is not cfg.tie_word_embeddings


def test_batch_holds_every_kind_of_row(parity):
    *_, batch, _, _, _ = parity
    ids = batch["input_ids"]
    assert int((ids == IMG).sum()) == sum(vision_tokens(g) for g in IMAGE_GRIDS)
    assert int((ids == VID).sum()) == sum(vision_tokens(g) for g in VIDEO_GRIDS)
    assert not ((ids[3] >= 1000) & batch["attention_mask"][3].bool()).any()  # a text-only row


def test_logits_and_loss_match_transformers(parity):
    *_, batch, _, (hf_logits, hf_loss, _), (mm_logits, mm_loss, _) = parity
    valid = batch["attention_mask"].bool()
    err = rel_err(mm_logits[valid], hf_logits[valid])
    print(f"logits rel err {err:.2e}, loss rel err {rel_err(mm_loss, hf_loss):.2e}")
    assert err < TOL
    assert rel_err(mm_loss, hf_loss) < TOL


def test_every_gradient_matches_transformers(parity):
    cfg, *_, (_, _, hf_grads), (_, _, mm_grads) = parity
    expected = hf_to_mm(hf_grads, cfg)
    assert set(expected) == set(mm_grads), set(expected) ^ set(mm_grads)
    assert all(g.abs().max() > 0 for g in expected.values())  # every parameter takes part
    errors = {k: rel_err(mm_grads[k], g) for k, g in expected.items()}
    worst = max(errors, key=errors.get)
    print(f"{len(errors)} gradients, worst {worst} rel err {errors[worst]:.2e}")
    assert errors[worst] < TOL, f"{worst}: {errors[worst]:.2e}"


def test_text_only_micro_batch_reaches_the_vision_encoder(parity):
    """No image or video in the micro-batch: the vision encoder runs on a dummy input (times zero), so every
    trainable parameter has a (zero) gradient and the loss is the one without it."""
    *_, model, batch, pos, _, _ = parity
    text_only = {k: batch[k][3:4] for k in ("input_ids", "attention_mask", "labels")}
    model.train()
    losses = {}
    for dummy in (False, True):
        model.zero_grad(set_to_none=True)
        model.dummy_encoder_forward = dummy
        out = model(position_ids=pos[:, 3:4], **text_only)
        out.loss.backward()
        losses[dummy] = out.loss.detach()
        no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert (not no_grad) if dummy else (no_grad and all(n.startswith("image_encoder.") for n in no_grad))
    model.dummy_encoder_forward = True
    model.eval()
    assert torch.equal(losses[True], losses[False])
