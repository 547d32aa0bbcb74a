"""torchrun worker: the Qwen3 vision encoder at TP=2 gives TP=1's outputs and gradients (gloo on CPU).

Phase 1 builds the TP=1 model on every rank with transformers' weights (through the table) and records
its merged and deepstack outputs and its gradients on two images of different grids and a video; phase 2
rebuilds megatron's groups at TP=2, loads each rank's shard of the same weights (along megatron's
``partition_dim``; the MLPs are ungated) and compares the outputs and the gathered gradients.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from mm_omni.platform import get_platform
from tests.parity.test_vision_qwen3 import (
    build_hf_visual, build_mm_visual, hf_visual_to_mm, load_mm, make_inputs, rel_err, run_mm, tiny_vision_config,
)

TOL = 1e-5


def main():
    get_platform()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = tiny_vision_config()
    assert world == 2 and cfg.num_heads == 2
    pixels, grid, probes = make_inputs(cfg)

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    ref_model = build_mm_visual(cfg)
    load_mm(ref_model, hf_visual_to_mm(cfg, build_hf_visual(cfg).state_dict()))
    full = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
    ref_merged, ref_deep, ref_pixel_grad, ref_grads = run_mm(ref_model, pixels, grid, probes)
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
                src = src.chunk(world, p.partition_dim)[rank]
                split += 1
            assert p.shape == src.shape, (n, p.shape, src.shape)
            p.copy_(src)
    # per layer: qkv w/b, fc1 w/b, proj w, fc2 w; each merger (final + deepstack): fc1 w/b, fc2 w
    assert split == 6 * cfg.depth + 3 * (1 + len(cfg.deepstack_visual_indexes)), split
    merged, deep, pixel_grad, grads = run_mm(model, pixels, grid, probes)

    errs = {"merged": rel_err(merged, ref_merged), "pixel grad": rel_err(pixel_grad, ref_pixel_grad)}
    errs.update({f"deepstack {k}": rel_err(d, r) for k, (d, r) in enumerate(zip(deep, ref_deep))})
    for n, g in grads.items():
        if getattr(params[n], "tensor_model_parallel", False):
            parts = [torch.empty_like(g) for _ in range(world)]
            dist.all_gather(parts, g.contiguous())
            g = torch.cat(parts, params[n].partition_dim)
        errs[n] = rel_err(g, ref_grads[n])
    worst = max(errs, key=errs.get)
    if errs[worst] >= TOL:
        raise AssertionError(f"rank {rank}: {worst} rel err {errs[worst]:.2e} (TP=2 vs TP=1)")
    if rank == 0:
        sys.stdout.write(f"VISION_QWEN3_TP_OK merged {errs['merged']:.3e} deepstack "
                         f"{max(errs[f'deepstack {k}'] for k in range(len(deep))):.3e} worst {worst} "
                         f"{errs[worst]:.3e} params {len(grads)} split {split}\n")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
