"""Megatron's ``--profile`` flags with torch's profiler: one trace and one table for a window of iterations.

``--profile --use-pytorch-profiler`` records iterations ``--profile-step-start`` to ``--profile-step-end``
(1-based, end excluded, as in Megatron) on the ranks of ``--profile-ranks``; the trace (Chrome/Perfetto JSON)
goes to ``--profile-dir`` (default ``--tensorboard-dir``, else ``./profile``), and the ops with the most host time (and, on
CUDA, the most device time) are logged as tables, so a run's per-step cost can be read from its log alone. ``--profile``
without ``--use-pytorch-profiler`` (Megatron's nsys mode) only marks the window with
``torch.cuda.profiler.start/stop`` for an outer ``nsys --capture-range=cudaProfilerApi``.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


class StepProfiler:
    def __init__(self, args):
        self.enabled = bool(args.profile) and torch.distributed.get_rank() in args.profile_ranks
        self.torch_profiler = bool(args.use_pytorch_profiler)
        self.start, self.end = args.profile_step_start, args.profile_step_end
        self.out = args.profile_dir or args.tensorboard_dir or "profile"
        self._prof = None

    def before_iteration(self, iteration: int) -> None:
        """``iteration``: the 1-based number of the iteration about to run."""
        if not self.enabled or iteration != self.start:
            return
        if not self.torch_profiler:
            torch.cuda.profiler.start()
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=True)
        self._prof.__enter__()

    def after_iteration(self, iteration: int) -> None:
        """``iteration``: the 1-based number of the iteration that just finished."""
        if not self.enabled or iteration != self.end - 1:
            return
        if not self.torch_profiler:
            torch.cuda.profiler.stop()
            return
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        self._prof.__exit__(None, None, None)
        os.makedirs(self.out, exist_ok=True)
        path = os.path.join(self.out, f"trace_rank{torch.distributed.get_rank()}_iters{self.start}-{self.end - 1}.json")
        self._prof.export_chrome_trace(path)
        table = self._prof.key_averages()
        # host time first: a step whose device is idle is bound by launches and syncs, seen only there
        sorts = ["self_cpu_time_total"] + (["self_cuda_time_total"] if torch.cuda.is_available() else [])
        for sort in sorts:
            logger.info("profile of iterations %d-%d by %s (trace: %s):\n%s", self.start, self.end - 1, sort,
                        path, table.table(sort_by=sort, row_limit=40))
        self._prof = None
