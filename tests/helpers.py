"""Pieces every parity test shares: the error measure, a 1-process megatron world, random weights."""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference relative to the reference's largest magnitude."""
    return float((a - b).abs().max() / b.abs().max())


def init_megatron(seed: int = 0) -> None:
    """A 1-process gloo world with megatron's TP=1 groups (kept for the session; other tests share it)."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from mm_omni.platform import get_platform
    from tests.distributed.torchrun import free_port

    get_platform()
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Perturb every parameter (norm weights and biases too, so their gradients matter)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
