"""torchrun worker: the homogeneous run and the ``--hetero-parallel`` run of one model, in one launch.

Usage: ``hetero_worker.py OUT_JSON [CASE MODEL_JSON HETERO_MODEL_JSON]... -- FLAGS...``. Per case,
run 1 trains ``MODEL_JSON`` with every module at the decoder's TP/PP of ``HETERO_MODEL_JSON``; run 2
trains ``HETERO_MODEL_JSON`` with ``--hetero-parallel`` (its tp/pp keys give the layout). Both start
from the same weights: every parameter is drawn from a seed of its global name at its full (tp=1)
shape, then cut to this rank's shard, so a tp=1 encoder and a TP-sharded one hold the same numbers.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from pathlib import Path

import torch

from mm_omni.train import main
from mm_omni.training.omni_task import omni_task
from tests.distributed.text_tp_worker import gated_names, shard


@torch.no_grad()
def init_by_name(model: torch.nn.Module) -> None:
    from megatron.core import parallel_state

    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    gated = gated_names(model)
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[:3] == ["text_decoder", "decoder", "layers"]:  # a later pipeline stage numbers from 0
            parts[3] = str(model.text_decoder.decoder.layers[int(parts[3])].layer_number - 1)
        gen = torch.Generator().manual_seed(zlib.crc32(".".join(parts).encode()))
        split = getattr(p, "tensor_model_parallel", False) and p.partition_dim >= 0
        shape = list(p.shape)
        if split:
            shape[p.partition_dim] *= tp
        if name.endswith(("norm.weight", "ln_post.weight")):
            full = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            full = 0.05 * torch.randn(shape, generator=gen)
        p.copy_(shard(full, p.partition_dim, name in gated, rank, tp) if split else full)


def run() -> None:
    """argv: OUT_JSON, then CASE MODEL_JSON HETERO_MODEL_JSON triples, then ``--`` and the shared flags."""
    out, rest = Path(sys.argv[1]), sys.argv[2:]
    cases, flags = rest[: rest.index("--")], rest[rest.index("--") + 1:]

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
    for case, model_json, hetero_json in zip(cases[::3], cases[1::3], cases[2::3]):
        text = json.loads(Path(hetero_json).read_text())["text_decoder"]
        homogeneous = ["--mm-model", model_json, "--tensor-model-parallel-size", str(text.get("tp", 1)),
                       "--pipeline-model-parallel-size", str(text.get("pp", 1)),
                       "--context-parallel-size", str(text.get("cp", 1))]
        for name, extra in (("homogeneous", homogeneous), ("hetero", ["--mm-model", hetero_json, "--hetero-parallel"])):
            res = main(flags + extra, task_factory=factory, keep_process_group=True)
            results[f"{case} {name}"] = {"losses": {str(k): v for k, v in res.losses.items()},
                                         "grad_norms": {str(k): float(v) for k, v in res.grad_norms.items()}}
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{out}.rank{rank}").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    run()
