"""torchrun worker: ``mm_omni.train`` on the tiny omni model + tiny data (``--mm-model`` / ``--mm-data``).

Usage: ``omni_train_worker.py OUT_JSON INIT_PT FLAGS...``. Every layout starts from the same weights:
the 1-process run writes its initial (TP=1) state to ``INIT_PT``; later runs load their TP shard of it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from mm_omni.train import main
from mm_omni.training.omni_task import omni_task
from tests.distributed.text_tp_worker import load_sharded


def _stage_names(model, full: dict) -> dict:
    """Full-model tensors under this pipeline stage's names (its decoder layers are numbered from 0)."""
    out = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if parts[:3] == ["text_decoder", "decoder", "layers"]:
            parts[3] = str(model.text_decoder.decoder.layers[int(parts[3])].layer_number - 1)
        out[name] = full[".".join(parts)]
    return out


def run() -> None:
    out, init = Path(sys.argv[1]), Path(sys.argv[2])
    flags = sys.argv[3:]

    def factory(args, model_cfg):
        task = omni_task(args, model_cfg)
        provider = task.model_provider

        def provider_from_init(pre, post, vp):
            model = provider(pre, post, vp)
            if not init.exists():
                torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, init)
            else:
                from megatron.core import parallel_state

                load_sharded(model, _stage_names(model, torch.load(init, weights_only=True)),
                             parallel_state.get_tensor_model_parallel_rank(),
                             parallel_state.get_tensor_model_parallel_world_size())
            return model

        task.model_provider = provider_from_init
        return task

    result = main(flags, task_factory=factory)
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{out}.rank{rank}").write_text(json.dumps(
        {"losses": {str(k): v for k, v in result.losses.items()},
         "grad_norms": {str(k): float(v) for k, v in result.grad_norms.items()}}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    run()
