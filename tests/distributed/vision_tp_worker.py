"""torchrun worker: the vision encoder at TP=2 gives TP=1's outputs and gradients (gloo on CPU).

Phase 1 builds the TP=1 model on every rank with transformers' weights (through the keymap) and
records its output and gradients on a batch of two images of different sizes and a video; phase 2
rebuilds megatron's groups at TP=2, loads each rank's shard of the same weights and compares the
output and the gathered gradients. The SwiGLU fc1 ``[gate; up]`` is split per half (each rank
holds ``[gate_r; up_r]``), everything else along megatron's ``partition_dim``.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from mm_omni.platform import get_platform
from tests.conftest import tiny_thinker_config
from tests.parity.test_vision import (
    build_hf_visual, build_mm_visual, hf_visual_to_mm, load_mm, make_inputs, rel_err, run_mm,
)

TOL = 1e-5


def _gated(name: str) -> bool:
    return name.startswith("encoder.") and ".mlp.linear_fc1." in name  # the ViT's SwiGLU, not the projector


def shard(name: str, full: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    if _gated(name):
        return torch.cat([half.chunk(world, dim)[rank] for half in full.chunk(2, dim)], dim)
    return full.chunk(world, dim)[rank]


def unshard(name: str, part: torch.Tensor, dim: int, world: int) -> torch.Tensor:
    parts = [torch.empty_like(part) for _ in range(world)]
    dist.all_gather(parts, part.contiguous())
    if _gated(name):
        halves = [p.chunk(2, dim) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim)
    return torch.cat(parts, dim)


def main():
    get_platform()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = tiny_thinker_config()
    assert world == 2 and cfg.vision_config.num_heads == 2
    pixels, grid, probe = make_inputs(cfg)

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    ref_model = build_mm_visual(cfg)
    load_mm(ref_model, hf_visual_to_mm(build_hf_visual(cfg).state_dict(), cfg))
    full = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
    ref_out, ref_grads = run_mm(ref_model, pixels, grid, probe)
    parallel_state.destroy_model_parallel()

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model = build_mm_visual(cfg)
    params = dict(model.named_parameters())
    split = 0
    with torch.no_grad():
        for n, p in params.items():
            src = full[n]
            if getattr(p, "tensor_model_parallel", False):
                src = shard(n, src, p.partition_dim, rank, world)
                split += 1
            assert p.shape == src.shape, (n, p.shape, src.shape)
            p.copy_(src)
    # per layer: qkv w/b, fc1 w/b, proj w, fc2 w; projector: fc1 w/b, fc2 w
    assert split == 6 * cfg.vision_config.depth + 3, split
    out, grads = run_mm(model, pixels, grid, probe)

    errs = {"output": rel_err(out, ref_out)}
    for n, g in grads.items():
        if getattr(params[n], "tensor_model_parallel", False):
            g = unshard(n, g, params[n].partition_dim, world)
        errs[n] = rel_err(g, ref_grads[n])
    worst = max(errs, key=errs.get)
    if errs[worst] >= TOL:
        raise AssertionError(f"rank {rank}: {worst} rel err {errs[worst]:.2e} (TP=2 vs TP=1)")
    if rank == 0:
        sys.stdout.write(f"VISION_TP_OK output {errs['output']:.3e} worst {worst} {errs[worst]:.3e} "
                         f"params {len(grads)} split {split}\n")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
