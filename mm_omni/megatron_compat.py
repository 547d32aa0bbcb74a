"""What differs between the megatron-core releases mm_omni supports (0.16.x and 0.19.x), in one place.

The rest of the package imports these names from here instead of branching on megatron-core's version.
Each entry says what moved and how each release reads it; the test suite runs on both releases.
Checked by reading both releases' sources: every other megatron-core name mm_omni uses (parallel_state,
the pipeline schedules, DDP and its config, the (distributed) optimizer and its parameter-state calls,
TransformerConfig fields, the fused bias-dropout-add / SwiGLU kernels, ProcessGroupCollection) is
called the same way in both. One behaviour moved without an API change: when a layer's output and its
residual differ in dtype, 0.16's bias-dropout-add casts the residual to the output's dtype, 0.19's casts the
output to the residual's; our chunks hold one dtype (``training/model_setup.py`` casts them), so neither cast runs.
"""

from __future__ import annotations

import functools

from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

# 0.19 builds a TransformerLayer's MLP by calling its ``mlp`` entry as
# ``entry(config=, pg_collection=, is_mtp_layer=, name=)`` and gives MLP a classmethod of that shape.
# A ModuleSpec(MLP) still works there, but the layer rewrites it into that call, in place in the shared
# spec, and logs a warning; 0.16 has no such classmethod and builds the ModuleSpec with ``tp_group``.
_MLP_AS_LAYER_SUBMODULE = getattr(MLP, "as_mlp_submodule", None)


def transformer_layer_mlp(submodules: MLPSubmodules):
    """The ``mlp`` entry of ``TransformerLayerSubmodules`` for a dense megatron ``MLP`` with ``submodules``."""
    if _MLP_AS_LAYER_SUBMODULE is not None:
        return functools.partial(_MLP_AS_LAYER_SUBMODULE, submodules=submodules)
    return ModuleSpec(module=MLP, submodules=submodules)


def moe_router_without_transformer_engine() -> None:
    """Let megatron's MoE router run without TransformerEngine.

    ``moe_utils.RouterGatingLinearFunction`` (the router's logits GEMM) tests ``te_general_gemm is not None``
    and otherwise takes its plain ``torch.mm`` path, but 0.16 binds that name only when the TransformerEngine
    import succeeds, so without TE every MoE forward fails with ``NameError: name 'te_general_gemm' is not
    defined``. Binding it to None selects the torch path and changes nothing else; where the name exists
    (TE installed, or a release that binds it either way) this does nothing.
    """
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def reset_moe_metric(name: str, num_layers: int, device, reduce_group) -> None:
    """megatron's per-layer record ``name`` (e.g. the routers' ``load_balancing_loss``) emptied and sized for a
    model of ``num_layers`` layers, reduced over ``reduce_group``: also on a rank whose layers record nothing.

    0.16 keeps the records in a module-level dict (``get_moe_layer_wise_logging_tracker()``); 0.19 in a
    ``MoEMetricsTracker`` whose ``get_moe_layer_wise_logging_tracker()`` returns a fresh copy (writes to it are
    lost) and whose ``clear()`` zeroes an entry but keeps its size, that of the first model that recorded it.
    """
    import torch
    from megatron.core.transformer.moe import moe_utils

    tracker_of = getattr(moe_utils, "get_moe_metrics_tracker", None)
    if tracker_of is None:  # 0.16
        moe_utils.get_moe_layer_wise_logging_tracker()[name] = {
            "values": torch.zeros(num_layers, device=device), "reduce_group": reduce_group, "avg_group": None,
            "reduce_group_has_dp": False}
        return
    tracker = tracker_of()
    tracker.metrics.pop(name, None)
    tracker.ensure_initialized(name, num_layers, device=device)
    tracker.metrics[name].reduce_group = reduce_group
