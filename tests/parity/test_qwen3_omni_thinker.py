"""Whole Qwen3-Omni thinker vs transformers' ``Qwen3OmniMoeThinkerForConditionalGeneration``: fp32 CPU.

Our model is :class:`~mm_omni.models.qwen3_omni_moe.model.Qwen3OmniModel` built from
:func:`~mm_omni.models.qwen3_omni_moe.hf_config.from_hf_thinker_config`, with transformers' weights copied in
through the family's key table (:mod:`mm_omni.models.qwen3_omni_moe.hf_mapping`: the text MoE, Qwen3 vision
with deepstack mergers and AuT audio tables) by ``converters.common.convert.hf_state_to_mm``. One
right-padded batch of five rows: an image; a video; an audio clip; an image and a clip; text only (images
and a video in one batch: transformers' joint deepstack path). Three deepstack layers (``deepstack_visual_indexes`` unsorted) feed decoder layers 0, 1, 2
of four (an addition after the last layer would reach no target). Both models get transformers'
``get_rope_index`` positions (fractional for the video).

Checked, rel err < 1e-5: logits and LM loss of the padded batch, and every parameter gradient of its LM
loss (megatron's load-balancing gradient scaled to 0 there: the padded decoder attends causally only, so
the padding positions' hidden states, which carry no target, differ from transformers' and so does their
routing, and megatron's per-layer loss counts every token of the forward). The same rows packed into one
``cu_seqlens`` row (no padding): the padded batch's logits and LM loss, megatron's per-layer load-balancing
losses, and every parameter gradient of ``lm + router_aux_loss_coef * mean over layers of transformers'
per-layer load-balancing loss`` (what we train, :mod:`mm_omni.models.text.moe`), transformers' per-layer
loss taken over the valid tokens (its attention mask).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import init_megatron, randomize_, rel_err

TOL = 1e-5
E, K = 8, 2
AUX = 0.05  # router_aux_loss_coef: large enough that its gradient is well above TOL
VOCAB = 512
TEXT_IDS = 400  # ordinary text ids are drawn below this; the special ids sit above
IMG, VID, AUD, AS, AE, VS, VE = 500, 501, 502, 503, 504, 505, 506
DEEPSTACK = [2, 0, 3]  # vision layers tapped (unsorted): their features go to decoder layers 0, 1, 2
IMAGE_GRIDS = [[1, 4, 4], [1, 4, 6]]
VIDEO_GRIDS = [[2, 4, 4]]
SECONDS_PER_GRID = [1.5]  # x position_id_per_seconds 13: fractional temporal positions
AUDIO_LENS = [37, 100]  # mel frames: clip of the audio row, clip of the image + audio row


def tiny_thinker_config(num_layers: int = 4):
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
        Qwen3OmniMoeAudioEncoderConfig, Qwen3OmniMoeTextConfig, Qwen3OmniMoeThinkerConfig,
        Qwen3OmniMoeVisionEncoderConfig,
    )

    text = Qwen3OmniMoeTextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [6, 5, 5],
                         "interleaved": True, "mrope_interleaved": True},
        moe_intermediate_size=32, num_experts=E, num_experts_per_tok=K, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=AUX, attention_bias=False,
    )
    vision = Qwen3OmniMoeVisionEncoderConfig(
        depth=4, hidden_size=32, intermediate_size=44, num_heads=2, in_channels=3, patch_size=4,
        temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=64, num_position_embeddings=36,
        deepstack_visual_indexes=DEEPSTACK, hidden_act="gelu_pytorch_tanh")
    audio = Qwen3OmniMoeAudioEncoderConfig(
        num_mel_bins=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=44, d_model=32,
        output_dim=64, downsample_hidden_size=8, n_window=50, n_window_infer=200, conv_chunksize=3,
        max_source_positions=64)
    cfg = Qwen3OmniMoeThinkerConfig(
        text_config=text, vision_config=vision, audio_config=audio, image_token_id=IMG, video_token_id=VID,
        audio_token_id=AUD, audio_start_token_id=AS, position_id_per_seconds=13, tie_word_embeddings=False)
    # not declared fields: transformers' get_rope_index reads vision_start_token_id from the config
    cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.audio_end_token_id = VS, VE, AE
    for sub in (cfg, cfg.text_config, cfg.vision_config, cfg.audio_config):
        sub._attn_implementation = "sdpa"
    return cfg


# -- the key table ------------------------------------------------------------------------------------------
def hf_to_mm(cfg, state: dict) -> dict:
    """transformers' tensors (or gradients; in-memory spelling, fused experts) -> our names, through the
    family's converter table (the stacks' tables under the thinker's names)."""
    from converters.common.convert import hf_state_to_mm
    from mm_omni.models.qwen3_omni_moe.convert import SPEC

    return hf_state_to_mm(SPEC, cfg, state)


# -- the batch ---------------------------------------------------------------------------------------------
def audio_tokens(mel_len: int) -> int:
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    return int(_get_feat_extract_output_lengths(torch.tensor(mel_len), 50))


def vision_tokens(grid, merge: int = 2) -> int:
    return int(np.prod(grid)) // merge**2


def build_rows(gen: torch.Generator) -> list[list[int]]:
    def text(n):
        return torch.randint(0, TEXT_IDS, (n,), generator=gen).tolist()

    a = [audio_tokens(n) for n in AUDIO_LENS]
    return [
        text(3) + [VS] + [IMG] * vision_tokens(IMAGE_GRIDS[0]) + [VE] + text(3),
        text(2) + [VS] + [VID] * vision_tokens(VIDEO_GRIDS[0]) + [VE] + text(4),
        text(2) + [AS] + [AUD] * a[0] + [AE] + text(3),
        text(2) + [VS] + [IMG] * vision_tokens(IMAGE_GRIDS[1]) + [VE] + text(1) + [AS] + [AUD] * a[1] + [AE] + text(2),
        text(12),
    ]


MODEL_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "pixel_values_videos",
              "video_grid_thw", "input_features", "feature_attention_mask")


def make_batch(cfg, seed: int = 3) -> dict:
    """Right-padded tensors for both models (labels: the text tokens, the first position of each row left out)."""
    gen = torch.Generator().manual_seed(seed)
    rows = build_rows(gen)
    b, s = len(rows), max(map(len, rows))
    ids = torch.zeros(b, s, dtype=torch.long)
    mask = torch.zeros(b, s, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    labels = torch.where((ids < TEXT_IDS) & mask.bool(), ids, -100)
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
    )


def hf_positions(hf, batch) -> torch.Tensor:
    """transformers' ``get_rope_index`` of the whole batch ([3, b, s], float; 0 on padding)."""
    return hf.model.get_rope_index(
        batch["input_ids"], batch["image_grid_thw"], batch["video_grid_thw"], batch["attention_mask"], False,
        batch["feature_attention_mask"].sum(-1), torch.tensor(SECONDS_PER_GRID))[0]


def packed(batch: dict, pos: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The valid tokens of every row in one ``cu_seqlens`` row, with their positions [3, 1, total]."""
    valid = batch["attention_mask"].bool()
    out = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels")}
    ids = batch["input_ids"][valid][None]
    out.update(input_ids=ids, labels=batch["labels"][valid][None], attention_mask=torch.ones_like(ids),
               cu_seqlens=torch.tensor([0] + valid.sum(1).tolist()).cumsum(0))
    return out, pos.permute(1, 2, 0)[valid].t()[:, None]


# -- the two models ----------------------------------------------------------------------------------------
def build_hf(cfg, seed: int = 0):
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerForConditionalGeneration

    torch.manual_seed(seed)
    hf = Qwen3OmniMoeThinkerForConditionalGeneration(cfg).float().eval()  # eval: no dropout (none is set anyway)
    randomize_(hf, seed + 1)  # router, q/k norms, every norm weight and bias get distinct values
    return hf


def build_mm(cfg, **kwargs):
    from mm_omni.models.qwen3_omni_moe.hf_config import from_hf_thinker_config
    from mm_omni.models.qwen3_omni_moe.model import Qwen3OmniModel

    mm_cfg = from_hf_thinker_config(cfg)
    return mm_cfg, Qwen3OmniModel(mm_cfg, **kwargs)


def load_mm(model, mm_state: dict) -> None:
    """Load our names; only megatron's ``_extra_state`` entries may be missing."""
    missing, unexpected = model.load_state_dict(mm_state, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("_extra_state") for k in missing), missing


def run_hf(hf, batch, pos) -> dict:
    """Logits, LM loss, per-layer load-balancing losses (all tokens), and the parameter gradients of
    ``lm + coef * mean(per-layer)`` over the valid tokens (``grads_valid``: transformers' load-balancing loss
    given the attention mask) and of ``lm`` alone (``grads_lm``)."""
    from transformers.loss.loss_utils import ForCausalLMLoss
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import load_balancing_loss_func

    out = hf(position_ids=pos, output_router_logits=True, **{k: batch[k] for k in MODEL_KEYS if k != "labels"})
    lm = ForCausalLMLoss(out.logits, batch["labels"], vocab_size=out.logits.shape[-1])
    mask = batch["attention_mask"]
    per_layer_valid = torch.stack([load_balancing_loss_func((r,), E, K, mask) for r in out.router_logits])
    names, params = zip(*[(n, p) for n, p in hf.named_parameters()])

    def grads(loss, retain=True):
        got = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
        return {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, params, got)}

    return dict(logits=out.logits.detach(), lm=lm.detach(), per_layer_valid=per_layer_valid.detach(),
                grads_valid=grads(lm + AUX * per_layer_valid.mean()), grads_lm=grads(lm, retain=False))


def run_mm(model, batch, pos, aux_scale: float = 1.0) -> dict:
    """Logits, LM loss, megatron's per-layer load-balancing losses and the gradients, the load-balancing
    gradient scaled by ``aux_scale`` (1: as one micro-batch trains)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from mm_omni.models.text.moe import load_balancing_losses

    n_layers = model.text_decoder.config.num_layers
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(aux_scale))
    load_balancing_losses(n_layers)  # clears what other tests left in megatron's tracker
    model.zero_grad(set_to_none=True)
    inputs = {k: batch[k] for k in MODEL_KEYS + ("cu_seqlens",) if k in batch}
    out = model(position_ids=pos, return_logits=True, **inputs)
    out.loss.backward()
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in model.named_parameters()}
    return dict(logits=out.logits.detach(), lm=out.loss.detach(), per_layer=load_balancing_losses(n_layers),
                grads=grads)


def grad_errors(expected: dict, got: dict) -> dict:
    assert set(expected) == set(got), set(expected) ^ set(got)
    return {k: rel_err(got[k], g) if g.abs().max() > 0 else float(got[k].abs().max()) for k, g in expected.items()}


def assert_below(errors: dict, what: str) -> None:
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOL, f"{what}: {worst} rel err {errors[worst]:.2e}"


@pytest.fixture(scope="module")
def parity():
    init_megatron()
    cfg = tiny_thinker_config()
    hf = build_hf(cfg)
    mm_cfg, model = build_mm(cfg)
    load_mm(model, hf_to_mm(cfg, hf.state_dict()))
    batch = make_batch(cfg)
    pos = hf_positions(hf, batch)
    return cfg, model, batch, pos, run_hf(hf, batch, pos), run_mm(model, batch, pos, aux_scale=0.0)


def test_batch_holds_every_kind_of_row(parity):
    cfg, model, batch, pos, _, _ = parity
    ids, valid = batch["input_ids"], batch["attention_mask"].bool()
    assert [sorted(set(r[v].tolist()) & {IMG, VID, AUD}) for r, v in zip(ids, valid)] == \
        [[IMG], [VID], [AUD], [IMG, AUD], []]
    assert int((ids == AUD).sum()) == sum(audio_tokens(n) for n in AUDIO_LENS)
    assert (pos[:, 1] != pos[:, 1].round()).any()  # the video's temporal positions are fractional
    # the thinker's stacks and the deepstack wiring are what model.json says
    assert type(model.image_encoder).__name__ == "Qwen3VisionEncoder"
    assert type(model.audio_encoder).__name__ == "AuTEncoder"
    assert len(model.image_encoder.deepstack_projectors) == len(DEEPSTACK) < cfg.text_config.num_hidden_layers


def test_logits_and_loss_match_transformers(parity):
    *_, batch, _, hf, mm = parity
    valid = batch["attention_mask"].bool()
    assert rel_err(mm["logits"][valid], hf["logits"][valid]) < TOL
    assert rel_err(mm["lm"], hf["lm"]) < TOL


def test_grads_match_transformers(parity):
    cfg, _, _, _, hf, mm = parity
    expected = hf_to_mm(cfg, hf["grads_lm"])
    errors = grad_errors(expected, mm["grads"])
    assert_below(errors, "padded batch, LM loss")
    unused = [k for k, g in expected.items() if not g.abs().max() > 0]
    assert not unused, unused  # every parameter (each expert, each deepstack merger) is reached


def test_deepstack_and_aux_loss_are_not_negligible(parity):
    """The checks above see the deepstack additions and the load-balancing term: without the aux term the
    router gradients differ well beyond TOL, and the deepstack mergers' gradients are as large as the main
    merger's (they reach the decoder only through the additions)."""
    cfg, _, _, _, hf, mm = parity
    with_aux, without = hf_to_mm(cfg, hf["grads_valid"]), hf_to_mm(cfg, hf["grads_lm"])
    router = "text_decoder.decoder.layers.1.mlp.router.weight"
    assert rel_err(without[router], with_aux[router]) > 100 * TOL
    for k in range(len(DEEPSTACK)):
        g = mm["grads"][f"image_encoder.deepstack_projectors.{k}.encoder.linear_fc2.weight"]
        assert g.abs().max() > 0.01 * mm["grads"]["image_encoder.projector.encoder.linear_fc2.weight"].abs().max()


def test_packed_batch_matches_padded(parity):
    """The five rows packed into one ``cu_seqlens`` row: the padded batch's logits and LM loss; megatron's
    per-layer load-balancing losses and the gradients with them equal transformers' over the valid tokens."""
    cfg, model, batch, pos, hf, mm = parity
    valid = batch["attention_mask"].bool()
    inputs, packed_pos = packed(batch, pos)
    out = run_mm(model, inputs, packed_pos)
    assert rel_err(out["logits"][0], mm["logits"][valid]) < TOL
    assert rel_err(out["lm"], mm["lm"]) < TOL
    # megatron's per-layer value (recorded / coeff) is transformers' per-layer formula / top-k
    assert rel_err(out["per_layer"] * K, hf["per_layer_valid"]) < TOL, (out["per_layer"] * K, hf["per_layer_valid"])
    assert_below(grad_errors(hf_to_mm(cfg, hf["grads_valid"]), out["grads"]), "packed batch")
