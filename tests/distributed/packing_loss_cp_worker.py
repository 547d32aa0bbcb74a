"""torchrun worker (2 gloo processes): a budget-packed micro-batch under CP=2 trains on the loss of CP=1.

Rows of several lengths (one without labels) are packed by the collator as budget packing lays them out for
CP=2 (every row padded to a multiple of 2 x CP, then bucket padding as a sequence of its own). The text
decoder runs them with CP=1 (reference, every rank) and with CP=2 (zig-zag share per rank, the decoder's
parallel layout), and :func:`loss_func` reduces each loss mode. Compared like training reduces them: the
divisor (summed over CP inside ``loss_func``, or by megatron for per-token), the reported loss averaged
over the CP group, the gradients averaged over CP (DDP over DP x CP).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from mm_omni.data.collate import OmniCollator
from mm_omni.data.packing import bucket_lengths
from mm_omni.data.template import IGNORE_INDEX
from mm_omni.parallel.context_parallel import pad_for_context_parallel
from mm_omni.parallel.decoder_layout import decoder_layout
from mm_omni.platform import get_platform
from mm_omni.training.forward_step import MODES, loss_func
from tests.conftest import tiny_thinker_config
from tests.helpers import randomize_, rel_err
from tests.parity.test_text import build_mm_text

LENGTHS, PROMPT = (13, 6, 21, 9), (4, 6, 10, 2)  # the second row has no label
TOL = 1e-5


def packed_batch() -> dict:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, p in zip(LENGTHS, PROMPT):
        ids = torch.randint(0, 1000, (n,), generator=gen)
        labels = ids.clone()
        labels[:p] = IGNORE_INDEX
        rows.append({"input_ids": ids, "labels": labels, "position_ids": torch.arange(n).expand(3, n).clone()})
    return OmniCollator(0, packing=True, bucket_lengths=bucket_lengths(32, 2, 4), segment_multiple=4)(rows)


def run(model, batch, mode, **kw):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                cu_seqlens=batch["cu_seqlens"], **kw)
    loss, count, report = loss_func(mode, out)
    (loss if mode == "per_token" else loss / count.clamp(min=1)).backward()
    return loss.detach(), count, report["lm loss"][0], {n: p.grad.clone() for n, p in model.named_parameters()}


def main():
    get_platform()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = tiny_thinker_config()
    batch = packed_batch()
    assert batch["cu_seqlens"].tolist() == [0, 16, 24, 48, 60, 64], batch["cu_seqlens"]  # rows, then the padding
    assert pad_for_context_parallel(batch, 4) is batch

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    torch.manual_seed(0)
    model = build_mm_text(cfg)
    randomize_(model, 1)
    state = model.state_dict()
    refs = {mode: run(model, batch, mode) for mode in MODES}
    parallel_state.destroy_model_parallel()

    parallel_state.initialize_model_parallel(context_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    group = parallel_state.get_context_parallel_group()
    model = build_mm_text(cfg, config_overrides={"context_parallel_size": 2})
    model.load_state_dict(state, strict=False)
    worst = {}
    for mode in MODES:
        _, count, report, grads = run(model, batch, mode, layout=decoder_layout(model))
        _, ref_count, ref_report, ref_grads = refs[mode]
        if mode == "per_token":  # this rank's sums: megatron adds them (and their counts) over DP x CP
            for t in (count, report):
                dist.all_reduce(t, group=group)
        else:  # the divisor is already global; the reported mean is averaged over the group, like DDP
            dist.all_reduce(report, group=group)
            report = report / 2
        assert int(count) == int(ref_count), (mode, int(count), int(ref_count))
        if mode == "per_sample":
            assert int(count) == 3, int(count)  # the rows with labels; not the packs, not the padding
        for g in grads.values():
            dist.all_reduce(g, group=group)
            if mode != "per_token":
                g /= 2  # DDP averages over CP; the x CP in loss_func makes the average the whole gradient
        errs = {n: rel_err(grads[n], g) for n, g in ref_grads.items() if g.any()}
        worst[mode] = max([rel_err(report, ref_report)] + list(errs.values()))
        assert worst[mode] < TOL, (mode, worst[mode], max(errs, key=errs.get))
    parallel_state.destroy_model_parallel()
    if rank == 0:
        sys.stdout.write(f"worst {worst}\nPACKING_LOSS_CP_OK\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
