"""torchrun worker: runs ``mm_omni.train.main`` on the stand-in task, several runs in one launch.

Usage: ``train_worker.py OUT_DIR RUN [--next RUN ...]`` where ``RUN`` = ``NAME FREEZE FLAGS...``
(``FREEZE``: comma list of parameter-name prefixes to freeze, or ``-``). Each run writes
``OUT_DIR/NAME.rankR.json``: reported losses, grad norms, and digests of frozen parameters before
and after training. A run whose launch fails writes its error message instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import traceback
from pathlib import Path

import torch

from mm_omni.train import main
from tests.distributed.standin_task import standin_task


def _digests(chunks):
    return {f"{i}.{name}": hashlib.sha256(p.detach().float().numpy().tobytes()).hexdigest()
            for i, chunk in enumerate(chunks) for name, p in chunk.named_parameters() if not p.requires_grad}


def run_one(out: Path, name: str, freeze: str, flags: list) -> None:
    prefixes = tuple(freeze.split(",")) if freeze != "-" else ()
    chunks, before = [], {}

    def factory(args, model_cfg):
        task = standin_task(args, prefixes)
        provider = task.model_provider

        def recording_provider(pre, post, vp):
            model = provider(pre, post, vp)
            chunks.append(model)
            before.update(_digests(chunks))
            return model

        task.model_provider = recording_provider
        return task

    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank}
    try:
        result = main(flags, task_factory=factory, keep_process_group=True)
        record.update(losses={str(k): v for k, v in result.losses.items()},
                      grad_norms={str(k): float(v) for k, v in result.grad_norms.items()},
                      iteration=result.iteration, consumed=result.consumed_samples)
    except (Exception, SystemExit) as err:  # reported to the test, which asserts on it
        record["error"] = f"{type(err).__name__}: {err}\n{traceback.format_exc()[-3000:]}"
        from mm_omni.training.initialize import destroy

        destroy(keep_process_group=True)
    record["frozen_before"], record["frozen_after"] = before, _digests(chunks)
    (out / f"{name}.rank{rank}.json").write_text(json.dumps(record))
    torch.distributed.barrier()


def run() -> None:
    out = Path(sys.argv[1])
    runs, current = [], []
    for tok in sys.argv[2:] + ["--next"]:
        if tok == "--next":
            runs.append(current)
            current = []
        else:
            current.append(tok)
    for name, freeze, *flags in runs:
        run_one(out, name, freeze, flags)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    run()
