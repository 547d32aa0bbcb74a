"""torchrun worker: the Qwen3-MoE text decoder at expert-parallel size 2, and at tensor-parallel size 2 with
sequence parallelism, equals one process (gloo on CPU).

Phase 1 builds the decoder at EP=1 on every rank with transformers' weights (through the stack's key
table) and runs each of the two rows alone. Phase 2 rebuilds megatron's groups at EP=2 (4 of the 8 experts
per rank, the all-gather dispatcher exchanging the tokens), rank r runs row r and must give that row's
logits, loss and per-layer load-balancing losses. Gradients: a rank's experts see the tokens of both
rows, so theirs equal the sum of the two single-row gradients; every other parameter's gradient, summed
over the ranks (what data parallelism reduces), equals it too.

Phase 3 (TP=2 + SP, experts split over TP: each rank half of every expert's ``[gate; up]`` rows and
``down`` columns) runs both rows as one batch through the parallel token layout and must give the batch's
logits, loss and gradients; the per-layer load-balancing losses of the two ranks (each its half of the
tokens' router probabilities, token counts reduced over TP) add up to the batch's. Gradients are reduced as
``finalize_model_grads`` does: sequence-parallel parameters (norms, router) and the q/k norms summed over TP.
"""

from __future__ import annotations

import re
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from mm_omni.parallel.decoder_layout import decoder_layout
from mm_omni.platform import get_platform
from tests.distributed.text_tp_worker import gathered_grads, load_sharded
from tests.parity.test_text_moe import E, build_hf, build_mm, hf_text_config, make_batch, mm_text_config, run_mm
from tests.helpers import rel_err

TOL = 1e-5
EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def global_name(name: str, rank: int, local: int) -> str:
    """The EP=1 name of a parameter of this rank (expert indices offset by the experts before it)."""
    return EXPERT.sub(lambda m: f".local_experts.{rank * local + int(m.group(1))}.", name)


def main():
    from mm_omni.models.text import TextDecoder

    get_platform()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    text = hf_text_config()
    ids, labels, pos = make_batch(text.vocab_size, b=2, s=10)
    rows = [dict(input_ids=ids[r:r + 1], position_ids=pos[:, r:r + 1], labels=labels[r:r + 1]) for r in range(2)]

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    ref = build_mm(text, *build_hf(text))
    full = {n: p.detach().clone() for n, p in ref.named_parameters()}
    refs = [run_mm(ref, **row) for row in rows]  # (logits, loss, per-layer aux, grads)
    batch = dict(input_ids=ids, position_ids=pos, labels=labels)
    ref_batch = run_mm(ref, **batch)
    summed = {n: refs[0][3][n] + refs[1][3][n] for n in full}
    parallel_state.destroy_model_parallel()

    parallel_state.initialize_model_parallel(expert_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model = TextDecoder(mm_text_config(text), config_overrides={"expert_model_parallel_size": 2})
    local = E // world
    names = {n: global_name(n, rank, local) for n, _ in model.named_parameters()}
    experts = {n for n in names if EXPERT.search(n)}
    assert len(experts) == 2 * local * text.num_hidden_layers, len(experts)  # fc1, fc2 per local expert
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(full[names[n]])

    logits, loss, aux, grads = run_mm(model, **rows[rank])
    errs = {"logits": rel_err(logits, refs[rank][0]), "loss": rel_err(loss, refs[rank][1]),
            "aux": rel_err(aux, refs[rank][2])}
    for n, g in grads.items():
        if n not in experts:
            g = g.clone()
            dist.all_reduce(g)
        errs[n] = rel_err(g, summed[names[n]])
    worst = max(errs, key=errs.get)
    if errs[worst] >= TOL:
        raise AssertionError(f"rank {rank}: {worst} rel err {errs[worst]:.2e} (EP=2 vs one process)")
    if rank == 0:
        sys.stdout.write(f"TEXT_MOE_EP_OK worst {worst} {errs[worst]:.3e} checked {len(errs)} "
                         f"experts {len(experts)}\n")
    parallel_state.destroy_model_parallel()

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model = TextDecoder(mm_text_config(text), config_overrides={"tensor_model_parallel_size": 2,
                                                                "sequence_parallel": True})
    split = load_sharded(model, full, rank, world)
    assert split == (1 + 1 + 2 * E) * text.num_hidden_layers + 2, split  # qkv, proj, experts; embedding, output
    logits, loss, aux, grads = run_mm(model, layout=decoder_layout(model), **batch)
    grads = gathered_grads(model, grads, world)
    params = dict(model.named_parameters())
    summed_over_tp = [n for n, p in params.items() if getattr(p, "sequence_parallel", False)
                      or "q_layernorm" in n or "k_layernorm" in n]
    assert len(summed_over_tp) == 5 * text.num_hidden_layers + 1, summed_over_tp  # 4 norms + router; final norm
    for n in summed_over_tp:
        dist.all_reduce(grads[n])
    dist.all_reduce(aux)
    errs = {"logits": rel_err(logits, ref_batch[0]), "loss": rel_err(loss, ref_batch[1]),
            "aux": rel_err(aux, ref_batch[2])}
    errs.update({n: rel_err(g, ref_batch[3][n]) for n, g in grads.items()})
    worst = max(errs, key=errs.get)
    if errs[worst] >= TOL:
        raise AssertionError(f"rank {rank}: {worst} rel err {errs[worst]:.2e} (TP=2 + SP vs one process)")
    if rank == 0:
        sys.stdout.write(f"TEXT_MOE_TP_OK worst {worst} {errs[worst]:.3e} checked {len(errs)} split {split}\n")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
