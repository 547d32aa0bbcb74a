"""torchrun worker: the audio encoder at TP=2 gives TP=1's outputs and gradients (gloo on CPU).

Phase 1 builds the TP=1 model on every rank (same seed -> same weights) and records its output and
gradients; phase 2 rebuilds megatron's groups at TP=2, loads each rank's shard of the same weights
(split along megatron's ``partition_dim``), and compares the output and the gathered gradients.
"""

from __future__ import annotations

import logging
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config
from mm_omni.models.audio import AudioEncoder
from mm_omni.platform import get_platform
from tests.conftest import tiny_thinker_config
from tests.helpers import rel_err

logger = logging.getLogger("audio_tp_worker")
TOL = 1e-5


def _is_split(p):
    return getattr(p, "tensor_model_parallel", False)


def _run(model, feats, lens, weight):
    model.zero_grad(set_to_none=True)
    out = model(feats, lens)
    (out * weight).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def main():
    get_platform()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = from_hf_thinker_config(tiny_thinker_config()).audio_encoder.audio_encoder
    assert cfg.num_attention_heads == 4 and world == 2

    torch.manual_seed(0)
    lens = torch.tensor([37, 100])
    feats = torch.randn(2, cfg.num_mel_bins, 100)
    weight = torch.randn(int((((lens - 1) // 2 + 1) // 2).sum()), cfg.output_dim)

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    ref_model = AudioEncoder(cfg)
    torch.manual_seed(1)
    with torch.no_grad():  # random norms and biases too, so their TP handling is exercised
        for p in ref_model.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    full = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
    ref_out, ref_grads = _run(ref_model, feats, lens, weight)
    parallel_state.destroy_model_parallel()

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model = AudioEncoder(cfg)
    split = 0
    with torch.no_grad():
        for n, p in model.named_parameters():
            src = full[n]
            if _is_split(p):
                src = src.chunk(world, dim=p.partition_dim)[rank]
                split += 1
            assert p.shape == src.shape, (n, p.shape, src.shape)
            p.copy_(src)
    assert split >= 4 * cfg.num_layers  # qkv w/b, fc1 w/b, proj w, fc2 w per layer at least
    out, grads = _run(model, feats, lens, weight)

    errs = {"output": rel_err(out, ref_out)}
    params = dict(model.named_parameters())
    for n, g in grads.items():
        if _is_split(params[n]):
            parts = [torch.empty_like(g) for _ in range(world)]
            dist.all_gather(parts, g.contiguous())
            g = torch.cat(parts, dim=params[n].partition_dim)
        errs[n] = rel_err(g, ref_grads[n])
    worst = max(errs, key=errs.get)
    if errs[worst] >= TOL:
        raise AssertionError(f"rank {rank}: {worst} rel err {errs[worst]:.2e} (TP=2 vs TP=1)")
    if rank == 0:
        sys.stdout.write(f"AUDIO_TP_OK output {errs['output']:.3e} worst {worst} {errs[worst]:.3e} "
                         f"params {len(grads)} split {split}\n")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
