"""Vision encoder vs transformers' Qwen2.5-Omni ``visual``: same weights, fp32 CPU, rel err < 1e-5.

One batch mixes two images of different sizes and a two-frame video, so window reordering,
per-frame full attention and the order restore are all exercised in one forward.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_thinker_config
from tests.helpers import init_megatron, rel_err  # noqa: F401 (re-exported to workers)

TOL = 1e-5
GRID_THW = [[1, 4, 6], [1, 8, 8], [2, 4, 4]]  # image 4x6 patches, image 8x8, video 2 frames of 4x4


def build_hf_visual(thinker_cfg, seed: int = 0):
    """transformers' vision encoder with every parameter randomised (norm weights too, so their grads matter)."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniVisionEncoder

    torch.manual_seed(seed)
    hf = Qwen2_5OmniVisionEncoder(thinker_cfg.vision_config).float()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hf


def hf_visual_to_mm(hf_visual, thinker_cfg) -> dict:
    """HF ``visual`` state (or grads) -> MindSpeed-MM ``image_encoder.*`` names, through the converter's keymap."""
    from converters.common.convert import hf_state_to_mm
    from mm_omni.models.qwen2_5_omni.convert import SPEC

    hf_state = {f"model.visual.{k}": v for k, v in hf_visual.items()}
    return {k: v for k, v in hf_state_to_mm(SPEC, thinker_cfg, hf_state).items() if k.startswith("image_encoder.")}


def load_mm(model, mm_state: dict):
    """Load ``image_encoder.*`` tensors; only megatron's ``_extra_state`` entries may be missing."""
    state = {k[len("image_encoder."):]: v for k, v in mm_state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("._extra_state") for k in missing), missing


def build_mm_visual(thinker_cfg, pg_collection=None):
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config
    from mm_omni.models.vision import VisionEncoder

    block = from_hf_thinker_config(thinker_cfg).image_encoder
    return VisionEncoder(block.vision_encoder, block.vision_projector, pg_collection=pg_collection)


def make_inputs(thinker_cfg, grid_thw=GRID_THW, seed: int = 1):
    v = thinker_cfg.vision_config
    grid = torch.tensor(grid_thw)
    n_patches = int(grid.prod(-1).sum())
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n_patches, v.in_channels * v.temporal_patch_size * v.patch_size**2, generator=gen)
    n_merged = n_patches // v.spatial_merge_size**2
    probe = torch.randn(n_merged, v.out_hidden_size, generator=gen)  # loss weights: every output matters
    return pixels, grid, probe


def run_hf(hf, pixels, grid, probe):
    out = hf(pixels, grid_thw=grid).pooler_output
    (out * probe).sum().backward()
    return out.detach(), {k: p.grad for k, p in hf.named_parameters()}


def run_mm(model, pixels, grid, probe):
    out = model(pixels, grid)
    (out * probe).sum().backward()
    return out.detach(), {k: p.grad for k, p in model.named_parameters()}


@pytest.fixture(scope="module")
def parity_run():
    init_megatron()
    cfg = tiny_thinker_config()
    hf = build_hf_visual(cfg)
    model = build_mm_visual(cfg)
    load_mm(model, hf_visual_to_mm(hf.state_dict(), cfg))
    pixels, grid, probe = make_inputs(cfg)
    hf_out, hf_grads = run_hf(hf, pixels, grid, probe)
    mm_out, mm_grads = run_mm(model, pixels, grid, probe)
    return cfg, hf_out, hf_grads, mm_out, mm_grads


def test_output_matches_transformers(parity_run):
    _, hf_out, _, mm_out, _ = parity_run
    assert mm_out.shape == hf_out.shape == (sum(t * h * w for t, h, w in GRID_THW) // 4, 64)
    assert rel_err(mm_out, hf_out) < TOL


def test_grads_match_transformers(parity_run):
    cfg, _, hf_grads, _, mm_grads = parity_run
    expected = hf_visual_to_mm(hf_grads, cfg)
    mm_grads = {f"image_encoder.{k}": g for k, g in mm_grads.items()}
    assert set(expected) == set(mm_grads)
    errors = {k: rel_err(mm_grads[k], g) for k, g in expected.items()}
    assert max(errors.values()) < TOL, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


def test_full_recompute_matches_transformers(parity_run):
    """MindSpeed-MM's ViT recompute keys (``recompute_granularity: full``) keep outputs and grads."""
    from megatron.core import tensor_parallel

    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config
    from mm_omni.models.vision import VisionEncoder

    cfg, hf_out, hf_grads, _, _ = parity_run
    tensor_parallel.model_parallel_cuda_manual_seed(0)  # checkpointing saves / restores the RNG tracker
    block = from_hf_thinker_config(cfg).image_encoder
    vit = block.vision_encoder.model_copy(
        update=dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1))
    model = VisionEncoder(vit, block.vision_projector)
    load_mm(model, hf_visual_to_mm(build_hf_visual(cfg).state_dict(), cfg))
    out, grads = run_mm(model, *make_inputs(cfg))
    assert rel_err(out, hf_out) < TOL
    expected = hf_visual_to_mm(hf_grads, cfg)
    assert max(rel_err(grads[k[len("image_encoder."):]], g) for k, g in expected.items()) < TOL


def test_window_layout_matches_transformers():
    """Window order, segments and 2D positions of ragged batches, against transformers' helpers."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    from mm_omni.models.vision.window_index import vision_layout

    for grid_thw in (GRID_THW, [[1, 16, 12], [3, 10, 14], [1, 2, 2]], [[2, 32, 30]]):
        grid = torch.tensor(grid_thw)
        for window in (28, 56, 112):  # 1, 2 and 4 merged tokens per window side
            layout = vision_layout(grid, 2, window, 14)
            window_index, cu_window = get_vision_window_index(grid, 2, window, 14)
            assert torch.equal(layout.window_index, window_index)
            assert torch.equal(layout.reverse_index, torch.argsort(window_index))
            assert torch.equal(layout.cu_window_seqlens, cu_window)
            assert torch.equal(layout.cu_seqlens, get_vision_cu_seqlens(grid))  # per frame
            positions = get_vision_position_ids(grid, 2).reshape(-1, 4, 2)[window_index].reshape(-1, 2)
            assert torch.equal(layout.pos_hw, positions)


def test_mismatched_pixels_are_rejected():
    init_megatron()
    cfg = tiny_thinker_config()
    model = build_mm_visual(cfg)
    pixels, grid, _ = make_inputs(cfg)
    with pytest.raises(ValueError, match="patches"):
        model(pixels[:-4], grid)
