"""Qwen3-VL-style vision encoder vs transformers' ``Qwen3OmniMoeVisionEncoder``: same weights, fp32 CPU.

One batch holds two images of different grids (one smaller, one larger than the learned 6 x 6 position
grid, so the interpolation both shrinks and stretches it) and a two-frame video. Checked: the final
merged features, every deepstack feature (``deepstack_visual_indexes`` deliberately unsorted, so the
layer order of the outputs and the merger of each entry are both exercised), the gradients of the
input pixels and of every parameter, and the index bookkeeping against transformers' helpers.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import init_megatron, randomize_, rel_err

TOL = 1e-5
GRID_THW = [[1, 4, 6], [1, 8, 10], [2, 6, 4]]  # image 4x6 patches, image 8x10, video of 2 frames of 6x4
DEEPSTACK = [3, 1]


def tiny_vision_config(**overrides):
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeVisionEncoderConfig

    # 44: not a multiple of 8, so the MLP's padded (aligned) fc2 path is what is checked
    kwargs = dict(depth=4, hidden_size=32, intermediate_size=44, num_heads=2, in_channels=3, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=48, num_position_embeddings=36,
                  deepstack_visual_indexes=DEEPSTACK, hidden_act="gelu_pytorch_tanh")
    kwargs.update(overrides)
    cfg = Qwen3OmniMoeVisionEncoderConfig(**kwargs)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_hf_visual(cfg, seed: int = 0):
    """transformers' encoder with every parameter randomised (norm weights and biases too)."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeVisionEncoder

    torch.manual_seed(seed)
    hf = Qwen3OmniMoeVisionEncoder(cfg).float()
    randomize_(hf, seed + 1)
    return hf


def build_mm_visual(cfg, pg_collection=None):
    from mm_omni.models.vision_qwen3.encoder import Qwen3VisionEncoder
    from mm_omni.models.vision_qwen3.hf_config import from_hf_vision_config

    return Qwen3VisionEncoder(*from_hf_vision_config(cfg), pg_collection=pg_collection)


def hf_visual_to_mm(cfg, hf_state) -> dict:
    """transformers' ``visual`` tensors (or gradients) -> our ``image_encoder.*`` names, through the table."""
    from mm_omni.models.vision_qwen3.hf_mapping import hf_state_to_mm

    return hf_state_to_mm(cfg, {f"visual.{k}": v for k, v in hf_state.items()})


def load_mm(model, mm_state: dict):
    """Load ``image_encoder.*`` tensors; only megatron's ``_extra_state`` entries may be missing."""
    state = {k[len("image_encoder."):]: v for k, v in mm_state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("._extra_state") for k in missing), missing


def make_inputs(cfg, grid_thw=GRID_THW, seed: int = 1):
    grid = torch.tensor(grid_thw)
    n_patches = int(grid.prod(-1).sum())
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n_patches, cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2, generator=gen)
    n_merged = n_patches // cfg.spatial_merge_size**2
    # loss weights for the merged output and each deepstack output: every output element matters
    probes = [torch.randn(n_merged, cfg.out_hidden_size, generator=gen) for _ in range(1 + len(DEEPSTACK))]
    return pixels, grid, probes


def _loss(merged, deepstack, probes):
    return sum((out * probe).sum() for out, probe in zip([merged, *deepstack], probes))


def run_hf(hf, pixels, grid, probes):
    pixels = pixels.clone().requires_grad_(True)
    out = hf(pixels, grid_thw=grid)
    merged, deepstack = out.pooler_output, list(out.deepstack_features)
    _loss(merged, deepstack, probes).backward()
    return (merged.detach(), [d.detach() for d in deepstack], pixels.grad,
            {k: p.grad for k, p in hf.named_parameters()})


def run_mm(model, pixels, grid, probes):
    pixels = pixels.clone().requires_grad_(True)
    merged, deepstack = model.features(pixels, grid)
    _loss(merged, deepstack, probes).backward()
    return (merged.detach(), [d.detach() for d in deepstack], pixels.grad,
            {k: p.grad for k, p in model.named_parameters()})


@pytest.fixture(scope="module")
def parity_run():
    init_megatron()
    cfg = tiny_vision_config()
    hf = build_hf_visual(cfg)
    model = build_mm_visual(cfg)
    load_mm(model, hf_visual_to_mm(cfg, hf.state_dict()))
    pixels, grid, probes = make_inputs(cfg)
    return cfg, run_hf(hf, pixels, grid, probes), run_mm(model, pixels, grid, probes)


def test_merged_features_match_transformers(parity_run):
    _, (hf_out, *_), (mm_out, *_) = parity_run
    assert mm_out.shape == hf_out.shape == (sum(t * h * w for t, h, w in GRID_THW) // 4, 48)
    assert rel_err(mm_out, hf_out) < TOL


def test_deepstack_features_match_transformers(parity_run):
    _, (_, hf_deep, *_), (_, mm_deep, *_) = parity_run
    assert len(mm_deep) == len(hf_deep) == len(DEEPSTACK)
    for k, (ours, ref) in enumerate(zip(mm_deep, hf_deep)):
        assert ours.shape == ref.shape
        assert rel_err(ours, ref) < TOL, f"deepstack feature {k}"
    assert rel_err(mm_deep[0], mm_deep[1]) > 0.1  # two different layers through two different mergers


def test_input_grads_match_transformers(parity_run):
    _, (*_, hf_pixel_grad, _), (*_, mm_pixel_grad, _) = parity_run
    assert rel_err(mm_pixel_grad, hf_pixel_grad) < TOL


def test_param_grads_match_transformers(parity_run):
    cfg, (*_, hf_grads), (*_, mm_grads) = parity_run
    expected = hf_visual_to_mm(cfg, hf_grads)
    mm_grads = {f"image_encoder.{k}": g for k, g in mm_grads.items()}
    assert set(expected) == set(mm_grads)
    assert all(g is not None and g.abs().max() > 0 for g in mm_grads.values())  # every parameter is used
    errors = {k: rel_err(mm_grads[k], g) for k, g in expected.items()}
    assert max(errors.values()) < TOL, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


def test_layout_matches_transformers():
    """Rotary positions, frame segments and the learned-position taps / weights, exactly."""
    from transformers.vision_utils import (
        get_vision_cu_seqlens, get_vision_interpolation_indices_and_weights, get_vision_position_ids,
    )

    from mm_omni.models.vision_qwen3.layout import qwen3_vision_layout

    for grid_thw, table in ((GRID_THW, 36), ([[1, 2, 2], [3, 10, 14]], 36), ([[1, 64, 46], [2, 2, 30]], 2304),
                            ([[1, 4, 4]], 1), ([[1, 6, 8]], 40)):
        grid = torch.tensor(grid_thw)
        layout = qwen3_vision_layout(grid, 2, table)
        index, weight = get_vision_interpolation_indices_and_weights(
            grid, int(table**0.5), mode="bilinear", align_corners=True, spatial_merge_size=2)
        assert torch.equal(layout.interp_index, index)
        assert torch.equal(layout.interp_weight, weight)
        assert torch.equal(layout.pos_hw, get_vision_position_ids(grid, 2))
        assert torch.equal(layout.cu_seqlens, get_vision_cu_seqlens(grid))
        assert layout.max_seqlen == int((grid[:, 1] * grid[:, 2]).max())


def test_items_round_trip(parity_run):
    """take_items / join_items of the shared patch items: a split batch encodes to the same tokens."""
    cfg = parity_run[0]
    model = build_mm_visual(cfg)
    pixels, grid, _ = make_inputs(cfg)
    assert model.item_tokens(grid) == [t * h * w // 4 for t, h, w in GRID_THW]
    parts = [model.take_items(pixels, grid, [2, 0]), model.take_items(pixels, grid, [1])]
    joined_px, joined_grid = model.join_items(parts)
    with torch.no_grad():
        full, _ = model.features(pixels, grid)
        joined, _ = model.features(joined_px, joined_grid)
        dummy, dummy_deep = model.features(*model.dummy_inputs())
    starts = [0, 6, 26, 38]  # merged tokens per item: 6, 20, 12
    reordered = torch.cat([full[starts[2]:starts[3]], full[starts[0]:starts[1]], full[starts[1]:starts[2]]])
    # the same math per item; a batch of another size may sum in another order (CPU GEMM blocking): fp32
    # rounding, not bit equality
    torch.testing.assert_close(joined, reordered, rtol=0, atol=1e-6)
    assert dummy.shape == (1, 48) and len(dummy_deep) == len(DEEPSTACK)


def test_mismatched_pixels_are_rejected():
    init_megatron()
    cfg = tiny_vision_config()
    model = build_mm_visual(cfg)
    pixels, grid, _ = make_inputs(cfg)
    with pytest.raises(ValueError, match="patches but grid_thw"):
        model(pixels[:-4], grid)


@pytest.mark.parametrize("overrides, field", [
    (dict(deepstack_visual_indexes=[1, 4]), "deepstack_visual_indexes"),
    (dict(deepstack_visual_indexes=[1, 1]), "deepstack_visual_indexes"),
    (dict(hidden_act="relu2"), "hidden_act"),
    (dict(patch_size=[4, 4]), "patch_size"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), "rope_parameters"),
    (dict(head_dim=8), "head_dim"),
])
def test_unsupported_config_values_are_refused(overrides, field):
    from mm_omni.models.vision_qwen3.hf_fields import check_vision_config

    cfg = tiny_vision_config()
    for key, value in overrides.items():  # set after construction: transformers' own checks would refuse some
        object.__setattr__(cfg, key, value)
    with pytest.raises(ValueError, match=f"vision_config.{field}"):
        check_vision_config(cfg)


def test_recompute_is_refused():
    from mm_omni.models.vision_qwen3.hf_config import from_hf_vision_config

    encoder, _ = from_hf_vision_config(tiny_vision_config())
    with pytest.raises(ValueError, match="recompute_granularity"):
        type(encoder).model_validate({**encoder.model_dump(), "recompute_granularity": "full"})


def test_flops_count_every_merger():
    from mm_omni.models.vision_qwen3.flops import qwen3_vision_flops
    from mm_omni.models.vision_qwen3.hf_config import from_hf_vision_config

    encoder, _ = from_hf_vision_config(tiny_vision_config())
    plain, _ = from_hf_vision_config(tiny_vision_config(deepstack_visual_indexes=[]))
    merger = 3 * 2 * (4 * 8 // 4) * (128 * 128 + 128 * 48)  # one merger over one 1x4x8 image, fwd+bwd
    assert qwen3_vision_flops(encoder, 48, [[1, 4, 8]]) - qwen3_vision_flops(plain, 48, [[1, 4, 8]]) == 2 * merger


def test_every_hf_field_is_audited():
    """The field list of hf_fields names every field transformers declares (a new one fails until audited)."""
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeVisionEncoderConfig

    from mm_omni.models.vision_qwen3 import hf_fields

    missing = [f for f in Qwen3OmniMoeVisionEncoderConfig.__annotations__ if f"``{f}``" not in hf_fields.__doc__]
    assert not missing, missing


@pytest.mark.parametrize("act", ["gelu", "silu", "quick_gelu"])
def test_mlp_activation_is_honoured(act):
    init_megatron()
    cfg = tiny_vision_config(hidden_act=act)
    hf = build_hf_visual(cfg)
    model = build_mm_visual(cfg)
    load_mm(model, hf_visual_to_mm(cfg, hf.state_dict()))
    pixels, grid, _ = make_inputs(cfg, grid_thw=[[1, 4, 6], [2, 4, 4]])
    with torch.no_grad():
        ref = hf(pixels, grid_thw=grid)
        merged, deepstack = model.features(pixels, grid)
    assert rel_err(merged, ref.pooler_output) < TOL
    assert max(rel_err(d, r) for d, r in zip(deepstack, ref.deepstack_features)) < TOL


@pytest.mark.parametrize("indexes", [[0, 4], [2, 2], [-1]])
def test_module_config_refuses_bad_deepstack_layers(indexes):
    from mm_omni.models.vision_qwen3.config import Qwen3VisionEncoderConfig
    from mm_omni.models.vision_qwen3.hf_config import from_hf_vision_config

    encoder, _ = from_hf_vision_config(tiny_vision_config())
    with pytest.raises(ValueError, match="deepstack_visual_indexes="):
        Qwen3VisionEncoderConfig.model_validate({**encoder.model_dump(), "deepstack_visual_indexes": indexes})
