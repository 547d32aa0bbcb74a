"""torchrun worker: the AuT audio encoder at TP=2 gives TP=1's outputs and gradients (gloo on CPU).

Phase 1 builds the TP=1 model on every rank with transformers' weights (through the table) and records
its output, input-feature gradient and parameter gradients on clips shorter than, equal to and longer
than a chunk; phase 2 rebuilds megatron's groups at TP=2, loads each rank's shard of the same weights
(along megatron's ``partition_dim``; the MLP is ungated, the front end and head replicated) and compares.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from mm_omni.platform import get_platform
from tests.parity.test_audio_aut import (
    build_hf_audio, build_mm_audio, hf_audio_to_mm, load_mm, make_inputs, rel_err, run_mm, tiny_audio_config,
)

TOL = 1e-5


def main():
    get_platform()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = tiny_audio_config()
    assert world == 2 and cfg.encoder_attention_heads == 2
    _, _, flat, lens, probe = make_inputs(cfg)

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    ref_model = build_mm_audio(cfg)
    load_mm(ref_model, hf_audio_to_mm(cfg, build_hf_audio(cfg).state_dict()))
    full = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
    ref_out, ref_feature_grad, ref_grads = run_mm(ref_model, flat, lens, probe)
    parallel_state.destroy_model_parallel()

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model = build_mm_audio(cfg)
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
    assert split == 6 * cfg.encoder_layers, split  # per layer: qkv w/b, fc1 w/b, proj w, fc2 w
    out, feature_grad, grads = run_mm(model, flat, lens, probe)

    errs = {"output": rel_err(out, ref_out), "feature grad": rel_err(feature_grad, ref_feature_grad)}
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
        sys.stdout.write(f"AUDIO_AUT_TP_OK output {errs['output']:.3e} worst {worst} {errs[worst]:.3e} "
                         f"params {len(grads)} split {split}\n")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
