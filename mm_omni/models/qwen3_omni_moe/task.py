"""Qwen3-Omni's training task: the omni task over :class:`~mm_omni.models.qwen3_omni_moe.model.Qwen3OmniModel`."""

from __future__ import annotations

import argparse

from mm_omni.training.task import TrainTask


def qwen3_omni_task(args: argparse.Namespace, model_cfg) -> TrainTask:
    from mm_omni.models.qwen3_omni_moe.flops import qwen3_omni_batch_flops
    from mm_omni.models.qwen3_omni_moe.model import Qwen3OmniModel
    from mm_omni.training.omni_task import omni_task

    return omni_task(args, model_cfg, model_class=Qwen3OmniModel, batch_flops=qwen3_omni_batch_flops)
