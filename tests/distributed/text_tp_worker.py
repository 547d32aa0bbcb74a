"""torchrun worker: the text decoder at TP=2 gives TP=1's logits, loss and gradients (gloo on CPU).

Phase 1 builds the TP=1 decoder on every rank with transformers' weights (through the keymap) and
records a right-padded batch and the same rows packed; phase 2 rebuilds megatron's groups at TP=2,
loads each rank's shard (vocab rows of the embedding and output layer, query groups of the QKV,
``[gate_r; up_r]`` of the SwiGLU fc1, input columns of the row-parallel linears) and compares.
:func:`shard` / :func:`unshard` serve the thinker worker too.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.mlp import MLP

from mm_omni.platform import get_platform
from tests.conftest import tiny_thinker_config
from tests.parity.test_text import (
    build_hf_text, build_mm_text, hf_text_state, hf_to_mm, load_mm, make_rows, pack_rows, pad_rows, rel_err,
)

TOL = 1e-5


def gated_names(model: torch.nn.Module) -> set[str]:
    """Names of the fused ``[gate; up]`` fc1 parameters (every MLP whose config has a GLU)."""
    names = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, MLP) and mod.config.gated_linear_unit:
            names |= {f"{mod_name}.linear_fc1.{leaf}" for leaf, _ in mod.linear_fc1.named_parameters()}
    return names


def shard(full: torch.Tensor, dim: int, gated: bool, rank: int, world: int) -> torch.Tensor:
    if gated:  # each rank holds [gate_r; up_r]
        return torch.cat([half.chunk(world, dim)[rank] for half in full.chunk(2, dim)], dim)
    return full.chunk(world, dim)[rank]


def unshard(part: torch.Tensor, dim: int, gated: bool, world: int) -> torch.Tensor:
    parts = [torch.empty_like(part) for _ in range(world)]
    dist.all_gather(parts, part.contiguous())
    if gated:
        halves = [p.chunk(2, dim) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim)
    return torch.cat(parts, dim)


def load_sharded(model: torch.nn.Module, full: dict, rank: int, world: int) -> int:
    """Copy this rank's shard of every full TP=1 parameter into ``model``; return how many were split."""
    gated, split = gated_names(model), 0
    with torch.no_grad():
        for n, p in model.named_parameters():
            src = full[n]
            if getattr(p, "tensor_model_parallel", False):
                src = shard(src, p.partition_dim, n in gated, rank, world)
                split += 1
            assert p.shape == src.shape, (n, p.shape, src.shape)
            p.copy_(src)
    return split


def gathered_grads(model: torch.nn.Module, grads: dict, world: int) -> dict:
    gated, params = gated_names(model), dict(model.named_parameters())
    out = {}
    for n, g in grads.items():
        p = params[n]
        out[n] = unshard(g, p.partition_dim, n in gated, world) if getattr(p, "tensor_model_parallel", False) else g
    return out


def compare(name: str, ref: tuple, got: tuple, rank: int) -> dict:
    """``ref`` / ``got`` = (logits, loss, {param: grad}); raise on any rel err >= TOL."""
    errs = {f"{name}.logits": rel_err(got[0], ref[0]), f"{name}.loss": rel_err(got[1], ref[1])}
    errs.update({f"{name}.{k}": rel_err(g, ref[2][k]) for k, g in got[2].items()})
    worst = max(errs, key=errs.get)
    if errs[worst] >= TOL:
        raise AssertionError(f"rank {rank}: {worst} rel err {errs[worst]:.2e} (TP=2 vs TP=1)")
    return errs


def run_model(model, **inputs):
    """Logits, loss and parameter gradients of one fwd+bwd."""
    model.zero_grad(set_to_none=True)
    out = model(return_logits=True, **inputs)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def reference_cases(cfg):
    """The padded and the packed batch of two rows, and the single-process (TP=1) text decoder's results.

    Returns ``cases`` (model inputs), ``valid`` (which logits are real tokens), ``full`` (the TP=1
    parameters, to shard) and ``refs`` (``run_model`` of each case at TP=1).
    """
    rows = make_rows(cfg.text_config.vocab_size)
    ids, labels, mask, pos = pad_rows(rows)
    p_ids, p_labels, p_pos, cu = pack_rows(rows)
    cases = {"padded": dict(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels),
             "packed": dict(input_ids=p_ids, position_ids=p_pos, labels=p_labels, cu_seqlens=cu)}
    valid = {"padded": mask.bool(), "packed": torch.ones_like(p_ids, dtype=torch.bool)}
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    ref_model = build_mm_text(cfg)
    load_mm(ref_model, hf_to_mm(hf_text_state(*build_hf_text(cfg), tied=False), cfg), "text_decoder.")
    full = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
    refs = {k: run_model(ref_model, **v) for k, v in cases.items()}
    parallel_state.destroy_model_parallel()
    return cases, valid, full, refs


def main():
    get_platform()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = tiny_thinker_config()
    assert world == 2 and cfg.text_config.num_key_value_heads == 2
    cases, valid, full, refs = reference_cases(cfg)

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model = build_mm_text(cfg, config_overrides={"tensor_model_parallel_size": 2})
    split = load_sharded(model, full, rank, world)
    layers = cfg.text_config.num_hidden_layers
    assert split == 5 * layers + 2, split  # qkv w/b, proj, fc1, fc2 per layer; embedding; output layer
    errs = {}
    for name, inputs in cases.items():
        logits, loss, grads = run_model(model, **inputs)
        ref_logits, ref_loss, ref_grads = refs[name]
        v = valid[name]
        errs.update(compare(name, (ref_logits[v], ref_loss, ref_grads),
                            (logits[v], loss, gathered_grads(model, grads, world)), rank))
    if rank == 0:
        worst = max(errs, key=errs.get)
        sys.stdout.write(f"TEXT_TP_OK worst {worst} {errs[worst]:.3e} checked {len(errs)} split {split}\n")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
