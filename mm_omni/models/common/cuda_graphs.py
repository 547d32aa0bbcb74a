"""CUDA graphs for the encoders' transformer blocks (opt-in, CUDA only).

The vision and audio encoders do a few percent of a step's FLOPs in hundreds of small kernels:
on a GPU they are bound by kernel launches, not by the chip. :class:`GraphedBlocks` captures one
call (forward and backward, through ``platform.make_graphed_callables``) per *shape key* and
replays it: the vision encoder's ``TransformerBlock``, the audio encoder's conv stem + blocks +
pooling + projection. The tensors that change from batch to batch without changing the
kernels' launch shapes (the hidden states, the rotary table, the ``cu_seqlens`` of the attention
segments) are graph inputs, copied into the graph's static buffers at each call, so one capture
serves every batch with the same token count, segment count and longest segment.

Where it does not apply, the call runs eagerly, with the same math: on the CPU / NPU, without
autograd (evaluation), when the key's forward is still waiting for its backward (a pipeline
schedule with several micro-batches in flight: the graph's activations live in static buffers),
after ``max_graphs`` captures, or when a capture fails (logged once per key).

Gradients: the graphed backward hands its parameter gradients over from static buffers, through
autograd, to the real parameters (graph inputs whose storage the graph reads in place: see
``_capture``). megatron's DDP moves each one into its ``main_grad`` buffer as it arrives, so gradient
accumulation over micro-batches is exact there; plain autograd accumulates into ``.grad`` as usual.
"""

from __future__ import annotations

import logging
from typing import Callable, Hashable

import torch

from mm_omni import platform

logger = logging.getLogger(__name__)


class _Call(torch.nn.Module):
    """``fn(*tensors)`` as a module that owns ``module`` (so ``functional_call`` can swap its parameters)."""

    def __init__(self, module: torch.nn.Module, fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.module = module
        self.fn = fn

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.fn(*tensors)


class _Entry:
    def __init__(self, fn):
        self.fn = fn
        self.pending = False  # forward replayed, backward not yet


class GraphedBlocks:
    """Per-shape-key CUDA graphs of an encoder's blocks (not an ``nn.Module``: registers no parameters).

    Measured on an H100 (bench/omni_step.py): vision encoder fwd+bwd 38-56 ms eager
    -> 8-9 ms graphed on 1024 patches; audio 35-44 ms -> 5-6 ms on 10 s.
    """

    def __init__(self, blocks: torch.nn.Module, max_graphs: int = 8):
        self.blocks = blocks
        self.max_graphs = max_graphs
        self.entries: dict[Hashable, _Entry | None] = {}

    def usable(self, hidden: torch.Tensor) -> bool:
        return (hidden.is_cuda and torch.is_grad_enabled() and self.blocks.training
                and not platform.is_capturing_graph())

    def __call__(self, key: Hashable, make_kwargs: Callable[..., dict], hidden: torch.Tensor,
                 *side: torch.Tensor) -> torch.Tensor:
        """``blocks(hidden, attention_mask=None, **make_kwargs(*side))``, graphed."""
        def fn(hidden, *side):
            return self.blocks(hidden, attention_mask=None, **make_kwargs(*side))

        return self.call(key, self.blocks, fn, hidden, *side)

    def call(self, key: Hashable, module: torch.nn.Module, fn: Callable[..., torch.Tensor],
             *inputs: torch.Tensor) -> torch.Tensor:
        """``fn(*inputs)``, graphed; ``module`` holds every parameter ``fn`` uses."""
        key = (key,) + tuple((t.shape, t.dtype, t.requires_grad) for t in inputs)
        entry = self.entries.get(key, False)
        if entry is False:
            entry = self._capture(key, module, fn, inputs) if len(self.entries) < self.max_graphs else None
        if entry is None or entry.pending:
            return fn(*inputs)
        out = entry.fn(*inputs)
        if out.requires_grad:
            entry.pending = True

            def done(grad, entry=entry):
                entry.pending = False
                return grad

            out.register_hook(done)
        return out

    def _capture(self, key, module, fn, inputs) -> _Entry | None:
        # The trainable parameters are graph inputs too, captured through detached aliases that share
        # their storage: megatron's DDP keeps each parameter's AccumulateGrad node alive (for its grad
        # hooks) and that node belongs to the default stream, which a capture on a side stream must not
        # touch. At replay the real parameters are passed; their storage is the aliases', so nothing is
        # copied, and the gradients the graph returns reach them (and DDP's hooks) through autograd.
        call = _Call(module, fn)
        named = [(f"module.{n}", p) for n, p in module.named_parameters() if p.requires_grad]
        names, params = [n for n, _ in named], tuple(p for _, p in named)
        n_inputs = len(inputs)

        def with_params(*tensors):
            return torch.func.functional_call(call, dict(zip(names, tensors[n_inputs:])), tensors[:n_inputs])

        sample = (tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in inputs)
                  + tuple(p.detach().requires_grad_() for p in params))
        try:
            graphed = platform.make_graphed_callables(with_params, sample, allow_unused_input=True)
        except Exception as err:  # noqa: BLE001 - any capture failure falls back to eager, once per key
            logger.warning("CUDA graph capture of %s failed (%s: %s); running it eagerly",
                           type(module).__name__, type(err).__name__, str(err)[:1000], exc_info=err)
            self.entries[key] = None
            platform.release_cached_memory()  # what the failed capture's private pool held
            return None
        entry = _Entry(lambda *tensors: graphed(*tensors, *params))
        self.entries[key] = entry
        logger.info("captured a CUDA graph of %s for %s", type(module).__name__, key)
        return entry


def enable_encoder_cuda_graphs(model: torch.nn.Module, max_graphs: int = 8) -> int:
    """Turn on CUDA graphs for every encoder in ``model`` that supports them; returns how many."""
    count = 0
    for module in model.modules():
        if hasattr(module, "graphed_blocks") and hasattr(module, "blocks"):
            module.graphed_blocks = GraphedBlocks(module.blocks, max_graphs=max_graphs)
            count += 1
    return count
