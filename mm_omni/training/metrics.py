"""Megatron's iteration line, TensorBoard scalars, and the end-of-run summary."""

from __future__ import annotations

import logging
from typing import Optional

from mm_omni import platform

logger = logging.getLogger(__name__)


def iteration_line(iteration: int, train_iters: int, consumed: int, ms_per_iter: float, lr: float,
                   global_batch_size: int, losses: dict, grad_norm: Optional[float],
                   tokens_per_sec_per_device: Optional[float] = None, loss_scale: Optional[float] = None,
                   skipped: int = 0, tflops_per_device: Optional[float] = None, mfu: Optional[float] = None) -> str:
    """The line Megatron prints, field for field (names, widths, separators), e.g.
    `` iteration       10/     100 | consumed samples: 80 | elapsed time per iteration (ms): 812.3 | ...``"""
    parts = [f" iteration {iteration:8d}/{train_iters:8d}", f"consumed samples: {consumed}",
             f"elapsed time per iteration (ms): {ms_per_iter:.1f}", f"learning rate: {lr:.6E}",
             f"global batch size: {global_batch_size}"]
    parts += [f"{name}: {value:.6E}" for name, value in losses.items()]
    if loss_scale is not None:
        parts.append(f"loss scale: {loss_scale:.1f}")
    if grad_norm is not None:
        parts.append(f"grad norm: {grad_norm:.3f}")
    if skipped:
        parts.append(f"number of skipped iterations: {skipped}")
    if tokens_per_sec_per_device is not None:
        parts.append(f"tokens per sec per device: {tokens_per_sec_per_device:.1f}")
    if tflops_per_device is not None:
        parts.append(f"model TFLOP/s per device: {tflops_per_device:.1f}")
    if mfu is not None:
        parts.append(f"MFU: {mfu:.1%}")
    return " | ".join(parts) + " |"


def require_tensorboard(log_dir: str) -> None:
    """Fail before any model is built when ``--tensorboard-dir`` is given but tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as err:
        raise ImportError(f"--tensorboard-dir {log_dir}: tensorboard is not installed "
                          f"({err}); pip install tensorboard, or drop the flag") from None


class TensorBoard:
    """Scalars under ``--tensorboard-dir`` (written by the last rank, which holds the loss)."""

    def __init__(self, log_dir: Optional[str], enabled: bool):
        self.writer = None
        if log_dir is None:
            return
        require_tensorboard(log_dir)
        from torch.utils.tensorboard import SummaryWriter

        if enabled:
            self.writer = SummaryWriter(log_dir=log_dir, max_queue=1000)

    def add(self, iteration: int, scalars: dict) -> None:
        if self.writer is not None:
            for name, value in scalars.items():
                if value is not None:
                    self.writer.add_scalar(name, value, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def summary_line(iterations: int, seconds: float, tokens: int, world_size: int, flops: float = 0.0,
                 peak_tflops: Optional[float] = None) -> str:
    tps = tokens / max(seconds, 1e-9)
    mfu = ""
    if flops and peak_tflops:
        tflops = flops / max(seconds, 1e-9) / world_size / 1e12
        mfu = f"| model TFLOP/s per device: {tflops:.1f} | MFU: {tflops / peak_tflops:.1%} "
    return (f"training done: {iterations} iterations in {seconds:.1f} s | tokens per sec: {tps:.1f} "
            f"| tokens per sec per device: {tps / world_size:.1f} {mfu}"
            f"| peak memory per device: {platform.max_memory_allocated_gib():.2f} GiB")


def resolve_peak_tflops(args) -> Optional[float]:
    """``--peak-tflops``, else the known peak of this GPU for bf16/fp16 runs; None = no MFU (said once)."""
    from mm_omni.training.flops import peak_tflops

    if not args.log_tps:
        return None
    if args.peak_tflops:
        return args.peak_tflops
    if not (args.bf16 or args.fp16):
        logger.info("--log-tps: MFU is reported for --bf16/--fp16 runs (give --peak-tflops for fp32)")
        return None
    name = platform.device_name()
    peak = peak_tflops(name)
    if peak is None:
        logger.info("--log-tps: no known bf16 peak for %r; give --peak-tflops to log MFU", name)
    return peak
