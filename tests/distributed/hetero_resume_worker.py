"""torchrun worker: ``--hetero-parallel`` with decoder PP (encoders on every stage) stops, saves and resumes.

Usage: ``hetero_resume_worker.py OUT_JSON HETERO_MODEL_JSON CKPT_DIR -- FLAGS...``. Run A trains 3 steps;
run B trains 2 steps and saves; run C loads B's checkpoint and trains step 3. Weights start as in
:mod:`tests.distributed.hetero_worker` (by name), so A and B start equal.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from mm_omni.train import main
from mm_omni.training.omni_task import omni_task
from tests.distributed.hetero_worker import init_by_name


def run() -> None:
    out, model_json, ckpt = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    flags = sys.argv[sys.argv.index("--") + 1:] + ["--mm-model", model_json, "--hetero-parallel"]

    def factory(args, model_cfg):
        task = omni_task(args, model_cfg)
        provider = task.model_provider

        def provider_by_name(pre, post, vp):
            model = provider(pre, post, vp)
            init_by_name(model)
            return model

        task.model_provider = provider_by_name
        return task

    results = {}
    for name, extra in (("A", ["--train-iters", "3"]), ("B", ["--train-iters", "2", "--save", ckpt]),
                        ("C", ["--train-iters", "3", "--load", ckpt])):
        res = main(flags + extra, task_factory=factory, keep_process_group=True)
        results[name] = {"losses": {str(k): v for k, v in res.losses.items()},
                         "grad_norms": {str(k): float(v) for k, v in res.grad_norms.items()}}
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{out}.rank{rank}").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    run()
