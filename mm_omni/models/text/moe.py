"""The decoder's mixture-of-experts settings on megatron-core, and its load-balancing loss.

Routing. megatron's ``TopKRouter`` with ``moe_router_pre_softmax=False`` takes the top-k router
logits and a softmax over those k: the same weights as a softmax over all experts, top-k, renormalised
to sum to 1 (transformers' ``norm_topk_prob=True``); ``moe_router_pre_softmax=True`` keeps the top-k of
the full softmax unnormalised (``norm_topk_prob=False``).

Load-balancing loss. transformers (Qwen3-MoE, Qwen3-Omni) adds ``router_aux_loss_coef *
load_balancing_loss_func(router logits of all layers)`` to its LM loss, with the token counts and
router probabilities pooled over every MoE layer, and only when ``output_router_logits`` is set.
megatron computes the Switch loss of each MoE layer on its own and feeds its gradient into the
backward (``MoEAuxLossAutoScaler``), outside the returned LM loss. We train with megatron's per-layer
loss. Per layer it is transformers' formula applied to that layer's logits alone, divided by top-k
(megatron counts the fraction of *assignments* per expert, transformers the fraction of tokens)::

    megatron_l = moe_aux_loss_coeff * load_balancing_loss_func((logits_l,), E, k) / k

so with ``moe_aux_loss_coeff = router_aux_loss_coef * k / n_moe_layers``
(:func:`aux_loss_coeff_from_hf`) the trained loss is ``router_aux_loss_coef`` times the mean over MoE
layers of transformers' per-layer value, which is transformers' pooled value when there is one MoE
layer (with several, the mean of per-layer losses is not the pooled loss; the per-layer form is
megatron's and balances every layer rather than their sum). All tokens of the forward count (padding
and packed rows alike; transformers leaves padding out when given an attention mask).
"""

from __future__ import annotations

from typing import Any

import torch


def moe_transformer_config(cfg: Any) -> dict:
    """``TransformerConfig`` fields of the text decoder config's mixture of experts."""
    return dict(
        num_moe_experts=cfg.num_moe_experts,
        moe_router_topk=cfg.moe_router_topk,
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_layer_freq=cfg.moe_layer_freq,
        moe_router_pre_softmax=cfg.moe_router_pre_softmax,
        moe_router_score_function="softmax",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
        moe_token_dispatcher_type=cfg.moe_token_dispatcher_type,
        # TE / grouped_gemm kernels: off (the experts are mm_omni.models.common.experts.GroupedExperts)
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
    )


def aux_loss_coeff_from_hf(router_aux_loss_coef: float, topk: int, num_moe_layers: int) -> float:
    """``moe_aux_loss_coeff`` giving ``router_aux_loss_coef`` x the mean over MoE layers of transformers'
    per-layer load-balancing loss (see the module docstring)."""
    if num_moe_layers < 1:
        raise ValueError(f"num_moe_layers={num_moe_layers}: a load-balancing loss needs at least one MoE layer")
    return router_aux_loss_coef * topk / num_moe_layers


def load_balancing_losses(num_layers: int, clear: bool = True) -> torch.Tensor:
    """The per-layer load-balancing losses (``megatron_l / moe_aux_loss_coeff``, 0 for dense layers) that
    megatron's router recorded since the last clear, summed over the forwards in between; ``[num_layers]``.

    Read on one rank, unreduced (megatron's ``reduce_aux_losses_tracker_across_ranks`` averages them for
    logging)."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from mm_omni.megatron_compat import reset_moe_metric

    entry = get_moe_layer_wise_logging_tracker().get("load_balancing_loss")
    values = torch.zeros(num_layers) if entry is None else entry["values"].detach().float().cpu().clone()
    if clear:  # emptied and sized for this model (a tracker left by another model keeps that model's size)
        reset_moe_metric("load_balancing_loss", num_layers, "cpu" if entry is None else entry["values"].device,
                         None if entry is None else entry.get("reduce_group"))
    return values
