"""What the loop needs from a model and its data, so the loop itself stays model-agnostic.

The omni model (:mod:`mm_omni.training.omni_task`) and the tiny stand-in of the tests both
implement this. Contract of ``forward(model, batch)``: on the last pipeline stage it returns an
object with ``per_token_loss`` and ``loss_mask`` (both ``[b, s]``, loss already zero where the mask
is 0); on any other stage the hidden-state tensor that goes to the next stage (or an object whose
``hidden_states`` is that tensor, as the omni model's ``DecoderOutput``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch


def count_label_free_tokens(batch: dict) -> int:
    """Tokens the model processed in a micro-batch: ``attention_mask`` ones, else every input id."""
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return int(batch["input_ids"].numel())


@dataclass
class TrainTask:
    name: str
    # (pre_process, post_process, vp_stage) -> a megatron module of this rank's pipeline stage
    model_provider: Callable[[bool, bool, Optional[int]], torch.nn.Module]
    # (model, micro-batch) -> output (see the module docstring)
    forward: Callable[[torch.nn.Module, dict], Any]
    # consumed samples -> iterator of this data-parallel rank's micro-batches, from that position on
    data_iterator: Callable[[int], Iterator[dict]]
    count_tokens: Callable[[dict], int] = count_label_free_tokens
    # micro-batch -> model FLOPs of its fwd+bwd (mm_omni.training.flops), for --log-tps's MFU; None: no MFU
    count_flops: Optional[Callable[[dict], float]] = None
    # fixed sequence length for the pipeline's p2p shapes; None = shapes travel with the tensors
    seq_length: Optional[int] = None
    # the model.json object, to compare with model-structure flags (None for stand-ins)
    model_config: Any = None
    # number of virtual pipeline chunks the model defines itself (model.json's nested lists)
    vpp_size: Optional[int] = None
    # consumed samples -> validation micro-batches (None: --eval-interval / --eval-iters do nothing)
    valid_data_iterator: Optional[Callable[[int], Iterator[dict]]] = None
    # model chunks -> None, run after megatron's finalize_model_grads (e.g. hetero encoders' grad sum)
    after_grad_sync: Optional[Callable[[list], None]] = None
    # (model chunks, the step's micro-batches, forward_only) -> None, run before each pipeline schedule;
    # when set the loop reads the step's micro-batches first (hetero encoders ahead of decoder PP)
    before_schedule: Optional[Callable[[list, list, bool], None]] = None
    # model chunks -> None, run before megatron's finalize_model_grads (the encoders' backward, then)
    before_grad_sync: Optional[Callable[[list], None]] = None
    # model chunks -> None, run after --load put the weights in (e.g. broadcast encoder copies)
    after_load: Optional[Callable[[list], None]] = None
