"""torchrun worker: ``mm_omni.train`` on a tiny omni model whose text decoder is a mixture of experts, several
runs in one launch.

Usage: ``moe_train_worker.py OUT_DIR INIT_PT RUN [--next RUN ...]``, ``RUN`` = ``NAME FLAGS...``. Every run starts
from the same weights: the first run that finds no ``INIT_PT`` (the 1-process one, EP 1) writes its state there;
later runs copy in their share of it (an EP rank its experts, renumbered from the global index ``ep_rank x
local + i`` to ``local_experts.i``; a TP rank its shard). Each run writes ``OUT_DIR/NAME.rankR.json``: losses, grad
norms, load-balancing losses per iteration, the decoder's MoE settings as built, or the error of a failed launch.
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
from pathlib import Path

import torch

from mm_omni.train import main
from mm_omni.training.omni_task import omni_task
from tests.distributed.text_tp_worker import gated_names, shard

EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def load_init(model, full: dict) -> None:
    from megatron.core import parallel_state as ps

    ep_rank, ep = ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()
    tp = (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size())
    etp = (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size())
    local = model.text_decoder.config.num_moe_experts // ep
    gated = gated_names(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            expert = EXPERT.search(n) is not None
            src = full[EXPERT.sub(lambda m: f".local_experts.{ep_rank * local + int(m.group(1))}.", n)]
            rank, world = etp if expert else tp
            if getattr(p, "tensor_model_parallel", False) and world > 1:
                src = shard(src, p.partition_dim, n in gated, rank, world)
            assert p.shape == src.shape, (n, p.shape, src.shape)
            p.copy_(src)


def run_one(out: Path, init: Path, name: str, flags: list) -> None:
    built = {}

    def factory(args, model_cfg):
        task = omni_task(args, model_cfg)
        provider = task.model_provider

        def provider_from_init(pre, post, vp):
            model = provider(pre, post, vp)
            if not init.exists():
                torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, init)
            else:
                load_init(model, torch.load(init, weights_only=True))
            cfg = model.text_decoder.config
            built.update(ep=cfg.expert_model_parallel_size, etp=cfg.expert_tensor_parallel_size,
                         capacity_factor=cfg.moe_expert_capacity_factor,
                         experts=sorted({m.group(0) for n, _ in model.named_parameters() for m in [EXPERT.search(n)]
                                         if m}))
            return model

        task.model_provider = provider_from_init
        return task

    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank}
    try:
        result = main(flags, task_factory=factory, keep_process_group=True)
        record.update(losses={str(k): v for k, v in result.losses.items()},
                      grad_norms={str(k): float(v) for k, v in result.grad_norms.items()},
                      balance={str(k): v for k, v in result.load_balancing_losses.items()},
                      iteration=result.iteration, consumed=result.consumed_samples, built=built)
    except (Exception, SystemExit) as err:  # reported to the test, which asserts on it
        record["error"] = f"{type(err).__name__}: {err}\n{traceback.format_exc()[-3000:]}"
        from mm_omni.training.initialize import destroy

        destroy(keep_process_group=True)
    (out / f"{name}.rank{rank}.json").write_text(json.dumps(record))
    torch.distributed.barrier()


def run() -> None:
    out, init = Path(sys.argv[1]), Path(sys.argv[2])
    runs, current = [], []
    for tok in sys.argv[3:] + ["--next"]:
        if tok == "--next":
            runs.append(current)
            current = []
        else:
            current.append(tok)
    for name, *flags in runs:
        run_one(out, init, name, flags)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    run()
