"""torchrun worker: several ``mm_omni.train`` runs back to back in one launch, each from the same initial weights.

Usage: ``multi_run_train_worker.py INIT_PT RUN [--next RUN ...]`` with ``RUN = OUT_JSON FLAGS...``. ``INIT_PT``
holds the full (TP=1) initial state written by a one-process run of ``omni_train_worker.py``; each run here loads
its TP shard / pipeline stage of it and writes ``OUT_JSON.rankR`` with its losses and gradient norms. One launch
for several layouts: process start-up dominates on 2 shared cores.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from mm_omni.train import main
from mm_omni.training.omni_task import omni_task
from tests.distributed.omni_train_worker import _stage_names
from tests.distributed.text_tp_worker import load_sharded


def run_one(init: Path, out: str, flags: list) -> None:
    def factory(args, model_cfg):
        task = omni_task(args, model_cfg)
        provider = task.model_provider

        def provider_from_init(pre, post, vp):
            from megatron.core import parallel_state

            model = provider(pre, post, vp)
            load_sharded(model, _stage_names(model, torch.load(init, weights_only=True)),
                         parallel_state.get_tensor_model_parallel_rank(),
                         parallel_state.get_tensor_model_parallel_world_size())
            return model

        task.model_provider = provider_from_init
        return task

    result = main(flags, task_factory=factory, keep_process_group=True)
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{out}.rank{rank}").write_text(json.dumps(
        {"losses": {str(k): v for k, v in result.losses.items()},
         "grad_norms": {str(k): float(v) for k, v in result.grad_norms.items()}}))
    torch.distributed.barrier()


if __name__ == "__main__":
    torch.set_num_threads(1)
    init_pt = Path(sys.argv[1])
    runs, cur = [], []
    for a in sys.argv[2:]:
        if a == "--next":
            runs.append(cur)
            cur = []
        else:
            cur.append(a)
    runs.append(cur)
    for run in runs:
        run_one(init_pt, run[0], run[1:])
