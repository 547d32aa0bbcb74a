"""torchrun worker: the text decoder's ``pad_token_id`` at TP=2 gives TP=1's logits, loss and gradients.

The pad id lies in rank 1's half of the vocabulary, so the rank that holds its embedding row is not
the one a rank-0-only mistake would cover. TP=1 equals transformers (test_hf_config_fields.py).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from mm_omni.platform import get_platform
from tests.conftest import tiny_thinker_config
from tests.distributed.text_tp_worker import compare, gathered_grads, load_sharded, run_model
from tests.parity.test_text import build_hf_text, build_mm_text, hf_text_state, hf_to_mm, load_mm, make_rows, pad_rows

PAD = 700  # vocab 1024: rank 1 holds rows 512..1023


def main():
    get_platform()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = tiny_thinker_config(text={"pad_token_id": PAD})
    rows = make_rows(cfg.text_config.vocab_size)
    for ids, _, _ in rows:
        ids[1::3] = PAD
    ids, labels, mask, pos = pad_rows(rows)
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    ref_model = build_mm_text(cfg)
    load_mm(ref_model, hf_to_mm(hf_text_state(*build_hf_text(cfg), tied=False), cfg), "text_decoder.")
    full = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
    ref = run_model(ref_model, **inputs)
    pad_row = ref[2]["embedding.word_embeddings.weight"][PAD]
    assert torch.equal(pad_row, torch.zeros_like(pad_row))
    parallel_state.destroy_model_parallel()

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model = build_mm_text(cfg, config_overrides={"tensor_model_parallel_size": 2})
    load_sharded(model, full, rank, world)
    logits, loss, grads = run_model(model, **inputs)
    valid = mask.bool()
    errs = compare("pad", (ref[0][valid], ref[1], ref[2]),
                   (logits[valid], loss, gathered_grads(model, grads, world)), rank)
    if rank == 0:
        worst = max(errs, key=errs.get)
        sys.stdout.write(f"PAD_TP_OK worst {worst} {errs[worst]:.3e}\n")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
