"""Whole thinker vs transformers' ``Qwen2_5OmniThinkerForConditionalGeneration``: fp32 CPU, rel err < 1e-5.

One right-padded batch of five rows: an image; a larger image and an audio clip; a plain video and
a second clip; text only; a video with its own audio (``use_audio_in_video``, video and audio tokens
interleaved in 2 s chunks). Placeholder counts are built by hand (image/video t*h*w/merge^2, audio
transformers' conv/pool formula). Positions: transformers' ``get_rope_index`` for transformers, ours
(:mod:`mm_omni.models.rope_index`) for our model, checked equal. Logits, loss and every parameter
gradient (through the keymap) are compared; then the dummy encoder forward and the count check.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import TINY_TOKEN_IDS, tiny_thinker_config
from tests.parity.test_text import hf_to_mm, init_megatron, load_mm, randomize_, rel_err

TOL = 1e-5
IMG, VID, AUD = (TINY_TOKEN_IDS[k] for k in ("image_token_index", "video_token_index", "audio_token_index"))
VS, VE = TINY_TOKEN_IDS["vision_start_token_id"], TINY_TOKEN_IDS["vision_end_token_id"]
AS, AE = TINY_TOKEN_IDS["audio_start_token_id"], TINY_TOKEN_IDS["audio_end_token_id"]
IMAGE_GRIDS = [[1, 4, 6], [1, 8, 8]]
VIDEO_GRIDS = [[2, 4, 4], [4, 4, 4]]  # the second one carries its own audio
SECONDS_PER_GRID = [2.0, 1.0]
AUDIO_LENS = [37, 100, 240]  # mel frames: clip 1, clip 2, the second video's audio


def audio_tokens(mel_len: int) -> int:
    """transformers' ``_get_feat_extract_output_lengths``: stride-2 conv, then stride-2 pooling."""
    return ((mel_len - 1) // 2 + 1 - 2) // 2 + 1


def vision_tokens(grid, merge: int = 2) -> int:
    return int(np.prod(grid)) // merge**2


def interleaved(grid, seconds_per_grid: float, n_audio: int, pps: int = 25, seconds_per_chunk: int = 2) -> list[int]:
    """Video and audio placeholders of an audio-in-video span, alternating per time chunk (video first)."""
    t, h, w = grid
    ticks = np.repeat((np.arange(t) * seconds_per_grid * pps).astype(np.int64), h * w // 4)
    per_chunk = pps * seconds_per_chunk
    n_chunks = int(max(ticks.max(), n_audio - 1) // per_chunk) + 1
    v_counts = np.bincount(ticks // per_chunk, minlength=n_chunks)
    a_counts = np.bincount(np.arange(n_audio) // per_chunk, minlength=n_chunks)
    out = []
    for v, a in zip(v_counts, a_counts):
        out += [VID] * int(v) + [AUD] * int(a)
    return out


def build_rows(gen: torch.Generator):
    def text(n):
        return torch.randint(0, 1000, (n,), generator=gen).tolist()

    a = [audio_tokens(n) for n in AUDIO_LENS]
    rows = [
        text(4) + [VS] + [IMG] * vision_tokens(IMAGE_GRIDS[0]) + [VE] + text(3),
        text(2) + [VS] + [IMG] * vision_tokens(IMAGE_GRIDS[1]) + [VE] + text(2) + [AS] + [AUD] * a[0] + [AE] + text(3),
        text(3) + [VS] + [VID] * vision_tokens(VIDEO_GRIDS[0]) + [VE] + [AS] + [AUD] * a[1] + [AE] + text(2),
        text(10),
        text(3) + [VS, AS] + interleaved(VIDEO_GRIDS[1], SECONDS_PER_GRID[1], a[2]) + [AE, VE] + text(3),
    ]
    # per row: image grids, video grids, seconds per grid, audio lengths, use_audio_in_video
    media = [([0], [], [], [], False), ([1], [], [], [0], False), ([], [0], [0], [1], False),
             ([], [], [], [], False), ([], [1], [1], [2], True)]
    return rows, media


def make_batch(cfg, seed: int = 3) -> dict:
    """Padded tensors for both models plus per-row media bookkeeping for the positions."""
    gen = torch.Generator().manual_seed(seed)
    rows, media = build_rows(gen)
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

    feats = torch.randn(len(AUDIO_LENS), cfg.audio_config.num_mel_bins, max(AUDIO_LENS), generator=gen)
    feat_mask = (torch.arange(max(AUDIO_LENS))[None] < torch.tensor(AUDIO_LENS)[:, None]).long()
    return dict(
        input_ids=ids, attention_mask=mask, labels=labels,
        pixel_values=pixels(IMAGE_GRIDS), image_grid_thw=torch.tensor(IMAGE_GRIDS),
        pixel_values_videos=pixels(VIDEO_GRIDS), video_grid_thw=torch.tensor(VIDEO_GRIDS),
        input_features=feats * feat_mask[:, None], feature_attention_mask=feat_mask,
        use_audio_in_video=torch.tensor([m[4] for m in media]), rows=rows, media=media,
    )


def hf_positions(hf, batch) -> torch.Tensor:
    """transformers' ``get_rope_index``, row by row (its ``use_audio_in_video`` is per call)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pos = torch.ones(3, *ids.shape, dtype=torch.long)
    for i, (imgs, vids, spg, auds, in_video) in enumerate(batch["media"]):
        pos[:, i:i + 1] = hf.model.get_rope_index(
            ids[i:i + 1], torch.tensor([IMAGE_GRIDS[k] for k in imgs]) if imgs else None,
            torch.tensor([VIDEO_GRIDS[k] for k in vids]) if vids else None, mask[i:i + 1], in_video,
            torch.tensor([AUDIO_LENS[k] for k in auds]) if auds else None,
            torch.tensor([SECONDS_PER_GRID[k] for k in spg]) if spg else None,
        )[0]
    return pos


def mm_positions(mm_cfg, batch) -> torch.Tensor:
    """Our ``rope_index.get_rope_index`` per unpadded row, padded with 1 like transformers."""
    from mm_omni.models.rope_index import get_rope_index

    ids = batch["input_ids"]
    pos = torch.ones(3, *ids.shape, dtype=torch.long)
    for i, (row, (imgs, vids, spg, auds, in_video)) in enumerate(zip(batch["rows"], batch["media"])):
        pos[:, i, :len(row)] = torch.as_tensor(get_rope_index(
            row, image_token_id=mm_cfg.image_token_id, video_token_id=mm_cfg.video_token_id,
            audio_token_id=mm_cfg.audio_token_id,
            image_grid_thw=torch.tensor([IMAGE_GRIDS[k] for k in imgs]) if imgs else None,
            video_grid_thw=torch.tensor([VIDEO_GRIDS[k] for k in vids]) if vids else None,
            video_second_per_grid=[SECONDS_PER_GRID[k] for k in spg], audio_seqlens=[AUDIO_LENS[k] for k in auds],
            use_audio_in_video=in_video,
            spatial_merge_size=mm_cfg.image_encoder.vision_encoder.spatial_merge_size,
            position_id_per_seconds=mm_cfg.position_id_per_seconds, seconds_per_chunk=mm_cfg.seconds_per_chunk,
        ))
    return pos


MODEL_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "pixel_values_videos",
              "video_grid_thw", "input_features", "feature_attention_mask", "use_audio_in_video")


def build_hf(cfg, seed: int = 0):
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration

    torch.manual_seed(seed)
    hf = Qwen2_5OmniThinkerForConditionalGeneration(cfg).float().eval()
    randomize_(hf, seed + 1)
    return hf


def build_mm(cfg, **kwargs):
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config
    from mm_omni.models.omni import OmniModel

    mm_cfg = from_hf_thinker_config(cfg)
    return mm_cfg, OmniModel(mm_cfg, **kwargs)


def hf_state(hf) -> dict:
    return {k: v for k, v in hf.state_dict().items()}


def run_hf(hf, batch, pos):
    hf.zero_grad(set_to_none=True)
    kwargs = {k: batch[k] for k in MODEL_KEYS if k != "use_audio_in_video"}
    out = hf(position_ids=pos, **kwargs)
    out.loss.backward()
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in hf.named_parameters()}
    return out.logits.detach(), out.loss.detach(), grads


def run_mm(model, batch, pos):
    model.zero_grad(set_to_none=True)
    out = model(position_ids=pos, return_logits=True, **{k: batch[k] for k in MODEL_KEYS + ("cu_seqlens",) if k in batch})
    out.loss.backward()
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in model.named_parameters()}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.fixture(scope="module")
def parity():
    init_megatron()
    cfg = tiny_thinker_config()
    hf = build_hf(cfg)
    mm_cfg, model = build_mm(cfg)
    load_mm(model, hf_to_mm(hf_state(hf), cfg), "")
    batch = make_batch(cfg)
    hf_pos, mm_pos = hf_positions(hf, batch), mm_positions(mm_cfg, batch)
    return cfg, mm_cfg, model, batch, hf_pos, mm_pos, run_hf(hf, batch, hf_pos), run_mm(model, batch, mm_pos)


def test_batch_holds_every_kind_of_row(parity):
    _, _, _, batch, hf_pos, mm_pos, _, _ = parity
    ids = batch["input_ids"]
    assert int((ids == IMG).sum()) == sum(vision_tokens(g) for g in IMAGE_GRIDS)
    assert int((ids == VID).sum()) == sum(vision_tokens(g) for g in VIDEO_GRIDS)
    assert int((ids == AUD).sum()) == sum(audio_tokens(n) for n in AUDIO_LENS)
    assert not ((ids[3] >= 1000) & batch["attention_mask"][3].bool()).any()  # a text-only row
    assert torch.equal(mm_pos, hf_pos), "our rope_index disagrees with transformers' get_rope_index"


def test_logits_and_loss_match_transformers(parity):
    *_, batch, _, _, (hf_logits, hf_loss, _), (mm_logits, mm_loss, _) = parity
    valid = batch["attention_mask"].bool()
    assert rel_err(mm_logits[valid], hf_logits[valid]) < TOL
    assert rel_err(mm_loss, hf_loss) < TOL


def test_grads_match_transformers(parity):
    cfg, *_, (_, _, hf_grads), (_, _, mm_grads) = parity
    expected = hf_to_mm(hf_grads, cfg)
    assert set(expected) == set(mm_grads), set(expected) ^ set(mm_grads)
    errors = {k: rel_err(mm_grads[k], g) if g.abs().max() > 0 else float(mm_grads[k].abs().max())
              for k, g in expected.items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOL, f"{worst}: {errors[worst]:.2e}"
    assert all(expected[k].abs().max() > 0 for k in expected if "audio_bos_eos_token" not in k)


def test_packed_batch_matches_transformers(parity):
    """The five rows packed into one ``cu_seqlens`` row give the padded batch's logits, loss and grads."""
    cfg, _, model, batch, _, mm_pos, (hf_logits, hf_loss, hf_grads), _ = parity
    valid = batch["attention_mask"].bool()
    packed = {k: batch[k] for k in MODEL_KEYS if k not in ("input_ids", "attention_mask", "labels")}
    ids = batch["input_ids"][valid][None]
    packed.update(input_ids=ids, labels=batch["labels"][valid][None], attention_mask=torch.ones_like(ids),
                  cu_seqlens=torch.tensor([0] + valid.sum(1).tolist()).cumsum(0))
    pos = mm_pos.permute(1, 2, 0)[valid].t()[:, None]  # [3, 1, total]
    logits, loss, grads = run_mm(model, packed, pos)
    assert rel_err(logits[0], hf_logits[valid]) < TOL
    assert rel_err(loss, hf_loss) < TOL
    expected = hf_to_mm(hf_grads, cfg)
    errors = {k: rel_err(grads[k], g) for k, g in expected.items() if g.abs().max() > 0}
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOL, f"{worst}: {errors[worst]:.2e}"


def test_dummy_encoder_forward_keeps_loss_and_reaches_every_parameter(parity):
    """A text-only micro-batch: the same loss with and without dummies; with them every trainable param has a grad."""
    *_, model, batch, _, mm_pos, _, _ = parity
    text_only = {"input_ids": batch["input_ids"][3:4], "attention_mask": batch["attention_mask"][3:4],
                 "labels": batch["labels"][3:4]}
    losses = {}
    for dummy in (False, True):
        model.zero_grad(set_to_none=True)
        model.dummy_encoder_forward = dummy
        out = model(position_ids=mm_pos[:, 3:4], **text_only)
        out.loss.backward()
        losses[dummy] = out.loss.detach()
        no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        if dummy:
            assert not no_grad, no_grad
        else:
            assert no_grad and all(n.startswith(("image_encoder.", "audio_encoder.")) for n in no_grad)
    model.dummy_encoder_forward = True
    assert torch.equal(losses[True], losses[False])
    enc_grads = [p.grad for n, p in model.named_parameters() if n.startswith("image_encoder.") and p.requires_grad]
    assert all(float(g.abs().max()) == 0.0 for g in enc_grads)


def test_placeholder_count_mismatch_is_a_clear_error(parity):
    *_, model, batch, _, mm_pos, _, _ = parity
    ids = batch["input_ids"].clone()
    ids[0, ids[0].tolist().index(IMG)] = 5  # one image placeholder fewer than the image has tokens
    kwargs = {k: batch[k] for k in MODEL_KEYS if k != "input_ids"}
    with pytest.raises(ValueError, match=f"placeholder token {IMG} appears"):
        with torch.no_grad():
            model(input_ids=ids, position_ids=mm_pos, **kwargs)
    with pytest.raises(ValueError, match=f"placeholder token {AUD} appears 1 times .* produced 0"):
        with torch.no_grad():
            ids = batch["input_ids"][3:4].clone()
            ids[0, 2] = AUD  # an audio placeholder but no audio in the batch
            model(input_ids=ids, attention_mask=batch["attention_mask"][3:4], position_ids=mm_pos[:, 3:4])
