"""torchrun worker: the whole thinker at TP=2 gives TP=1's logits, loss and gradients (gloo on CPU).

Same batch as ``tests/parity/test_thinker.py`` (images of two sizes, a video, audio clips, a text-only
row, an audio-in-video row). Phase 1: TP=1 with transformers' weights through the keymap; phase 2:
TP=2 with each rank's shard (vision, audio and text stacks all split); gradients are gathered back.
"""

from __future__ import annotations

import sys

import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from mm_omni.platform import get_platform
from tests.conftest import tiny_thinker_config
from tests.distributed.text_tp_worker import compare, gathered_grads, load_sharded
from tests.parity.test_text import hf_to_mm, load_mm
from tests.parity.test_thinker import MODEL_KEYS, build_hf, build_mm, hf_state, make_batch, mm_positions


def _run(model, batch, pos):
    model.zero_grad(set_to_none=True)
    out = model(position_ids=pos, return_logits=True, **{k: batch[k] for k in MODEL_KEYS})
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


def main():
    get_platform()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = tiny_thinker_config()
    assert world == 2
    batch = make_batch(cfg)

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    mm_cfg, ref_model = build_mm(cfg)
    load_mm(ref_model, hf_to_mm(hf_state(build_hf(cfg)), cfg), "")
    pos = mm_positions(mm_cfg, batch)
    full = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
    ref_logits, ref_loss, ref_grads = _run(ref_model, batch, pos)
    parallel_state.destroy_model_parallel()

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    _, model = build_mm(cfg, text_config_overrides={"tensor_model_parallel_size": 2})
    split = load_sharded(model, full, rank, world)
    prefixes = {n.split(".")[0] for n, p in model.named_parameters() if getattr(p, "tensor_model_parallel", False)}
    assert prefixes == {"image_encoder", "audio_encoder", "text_decoder"}, prefixes
    logits, loss, grads = _run(model, batch, pos)
    valid = batch["attention_mask"].bool()
    errs = compare("thinker", (ref_logits[valid], ref_loss, ref_grads),
                   (logits[valid], loss, gathered_grads(model, grads, world)), rank)
    if rank == 0:
        worst = max(errs, key=errs.get)
        sys.stdout.write(f"THINKER_TP_OK worst {worst} {errs[worst]:.3e} checked {len(errs)} split {split}\n")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
