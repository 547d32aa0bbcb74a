"""torchrun worker (2 gloo processes): the text decoder with TP=2 + sequence parallel, and with CP=2,
gives the single-GPU decoder's logits, loss and gradients; padded and packed batches.

Rows have lengths 12 and 7. Phase 1 builds the TP=1/CP=1 reference on every rank from transformers'
weights. Phase 2 (TP=2 + SP) and phase 3 (CP=2, zig-zag split of every sequence) run the same rows,
padded by :func:`pad_for_context_parallel` to what the split needs (the packed row's 7-token sequence
becomes 8), with the decoder's parallel token layout (:func:`decoder_layout`), and compare on the real tokens. Gradients are reduced as training reduces them: norm
weights summed over TP under SP (megatron's ``finalize_model_grads``), everything summed over CP
(DDP over DP x CP).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from mm_omni.parallel.context_parallel import pad_for_context_parallel, split_for_context_parallel
from mm_omni.parallel.decoder_layout import decoder_layout
from mm_omni.platform import get_platform
from tests.conftest import tiny_thinker_config
from tests.distributed.text_tp_worker import compare, gathered_grads, load_sharded, reference_cases, run_model
from tests.parity.test_text import build_mm_text, load_mm


def _real(batch: dict, padded: dict) -> torch.Tensor:
    """Positions of ``padded`` [s'] that hold the tokens of ``batch`` [s] (padding inserted per sequence)."""
    if batch.get("cu_seqlens") is None:
        return torch.arange(batch["input_ids"].shape[1])
    old, new = batch["cu_seqlens"].tolist(), padded["cu_seqlens"].tolist()
    return torch.cat([torch.arange(n, n + (e - s)) for s, e, n in zip(old[:-1], old[1:], new[:-1])])


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if v is not None}


def main():
    get_platform()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    cfg = tiny_thinker_config()
    cases, valid, full, refs = reference_cases(cfg)  # rows of lengths 12 and 7
    errs = {}

    # -- TP=2 + sequence parallel ---------------------------------------------------------------
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model = build_mm_text(cfg, config_overrides={"tensor_model_parallel_size": 2, "sequence_parallel": True})
    load_sharded(model, full, rank, world)
    marked = [n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False)]
    assert len(marked) == 2 * cfg.text_config.num_hidden_layers + 1, marked  # 2 norms per layer + final norm
    for name, batch in cases.items():
        padded = pad_for_context_parallel(batch, 2)
        logits, loss, grads = run_model(model, layout=decoder_layout(model), **_inputs(padded))
        grads = gathered_grads(model, grads, world)
        for n in marked:  # what finalize_model_grads does for sequence_parallel parameters
            dist.all_reduce(grads[n])
        ref_logits, ref_loss, ref_grads = refs[name]
        real = _real(batch, padded)
        errs.update(compare(f"sp.{name}", (ref_logits[valid[name]], ref_loss, ref_grads),
                            (logits[:, real][valid[name]], loss, grads), rank))
    parallel_state.destroy_model_parallel()

    # -- CP=2 -------------------------------------------------------------------------------------
    parallel_state.initialize_model_parallel(context_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    group = parallel_state.get_context_parallel_group()
    model = build_mm_text(cfg, config_overrides={"context_parallel_size": 2})
    load_mm(model, full, "")
    for name, batch in cases.items():
        padded = pad_for_context_parallel(batch, 4)
        logits, loss, grads = run_model(model, layout=decoder_layout(model), **_inputs(padded))
        for g in grads.values():
            dist.all_reduce(g, group=group)
        # this rank's logits are its zig-zag share; put the sequence back together
        split = split_for_context_parallel(group, padded["input_ids"].shape[1], padded.get("cu_seqlens"))
        parts = [torch.empty_like(logits) for _ in range(2)]
        dist.all_gather(parts, logits.contiguous(), group=group)
        whole = torch.empty(logits.shape[0], split.kv_index.numel(), logits.shape[2])
        whole[:, split.kv_index] = torch.cat(parts, 1)
        ref_logits, ref_loss, ref_grads = refs[name]
        real = _real(batch, padded)
        errs.update(compare(f"cp.{name}", (ref_logits[valid[name]], ref_loss, ref_grads),
                            (whole[:, real][valid[name]], loss, grads), rank))
    parallel_state.destroy_model_parallel()

    if rank == 0:
        for prefix in ("sp.", "cp."):
            part = {k: v for k, v in errs.items() if k.startswith(prefix)}
            worst = max(part, key=part.get)
            sys.stdout.write(f"worst {worst} {part[worst]:.3e} of {len(part)}\n")
        sys.stdout.write("TEXT_SP_CP_OK\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
