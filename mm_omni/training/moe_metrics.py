"""The load-balancing loss of a mixture-of-experts decoder, per iteration, for the log (megatron's tracker).

megatron's routers record each MoE layer's load-balancing loss (without its ``moe_aux_loss_coeff``) in a
tracker, summed over the micro-batches of the step; its ``track_moe_metrics`` sums them over the pipeline
stages and over the tensor x context-parallel ranks of a layer (each holds part of the tokens' router
probabilities), averages over data-parallel ranks, and reports the sum over layers / the number of MoE
layers, times the scale it is given (1 / micro-batches: the mean over them). It is a collective, so every
rank calls it every training iteration (it also clears the tracker for the next step).

The gradient of that loss is scaled by megatron's schedule (``MoEAuxLossAutoScaler.set_loss_scale`` in
``forward_step``: the optimizer's loss scale / micro-batches, or with ``--calculate-per-token-loss`` the
router's token count against ``finalize_model_grads``' global one); nothing here touches it.
"""

from __future__ import annotations

from typing import Optional

from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import track_moe_metrics

from mm_omni import platform
from mm_omni.megatron_compat import reset_moe_metric

NAME = "load_balancing_loss"


def has_experts(config) -> bool:
    return getattr(config, "num_moe_experts", None) is not None


def start_tracker(config) -> None:
    """An empty entry on every rank (a pipeline stage without MoE layers records nothing but still joins
    the reductions), sized for this model, with the group megatron's router reduces over; anything left
    from before (another model in this process) is dropped."""
    reset_moe_metric(NAME, config.num_layers, platform.get_platform().device,
                     parallel_state.get_tensor_and_context_parallel_group())


def step_load_balancing_loss(config, num_microbatches: int) -> Optional[float]:
    """This step's load-balancing loss (mean over micro-batches, data-parallel ranks and MoE layers);
    None for a model without experts. Call on every rank after each training schedule."""
    if not has_experts(config):
        return None
    out: dict = {}
    track_moe_metrics(loss_scale=1.0 / num_microbatches, iteration=0, total_loss_dict=out, track_names=[NAME],
                      num_layers=config.num_layers, moe_layer_freq=config.moe_layer_freq)
    return float(out[NAME])
