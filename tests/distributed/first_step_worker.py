"""torchrun worker: ``mm_omni.train`` (the real omni task, ``--load`` of a converted checkpoint), several runs in
one launch; records the micro-batches each rank consumed so the test can run transformers on the same batches.

Usage: ``first_step_worker.py OUT_DIR RUN [--next RUN ...]`` with ``RUN = NAME FLAGS...``. Each run writes
``OUT_DIR/NAME.rankR.pt``: ``{"losses", "tp", "pp", "dp", "batches"}`` (a failed run: ``{"error"}``).
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch

from mm_omni.train import main
from mm_omni.training.omni_task import omni_task


def run_one(out: Path, name: str, flags: list) -> None:
    batches: list = []
    ranks: dict = {}

    def factory(args, model_cfg):
        from megatron.core import parallel_state as ps

        ranks.update(tp=ps.get_tensor_model_parallel_rank(), pp=ps.get_pipeline_model_parallel_rank(),
                     dp=ps.get_data_parallel_rank())
        task = omni_task(args, model_cfg)
        make_iter = task.data_iterator

        def recording(consumed):
            for batch in make_iter(consumed):
                batches.append({k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)})
                yield batch

        task.data_iterator = recording
        return task

    rank = int(os.environ.get("RANK", "0"))
    record: dict = {}
    try:
        result = main(flags, task_factory=factory, keep_process_group=True)
        record = {"losses": dict(result.losses), "batches": batches, **ranks}
    except (Exception, SystemExit) as err:  # reported to the test, which shows it
        record = {"error": f"{type(err).__name__}: {err}\n{traceback.format_exc()[-3000:]}"}
        from mm_omni.training.initialize import destroy

        destroy(keep_process_group=True)
    torch.save(record, out / f"{name}.rank{rank}.pt")
    torch.distributed.barrier()


if __name__ == "__main__":
    torch.set_num_threads(1)
    out_dir = Path(sys.argv[1])
    runs, cur = [], []
    for a in sys.argv[2:]:
        if a == "--next":
            runs.append(cur)
            cur = []
        else:
            cur.append(a)
    runs.append(cur)
    for run in runs:
        run_one(out_dir, run[0], run[1:])
