"""torchrun worker (2 ranks, TP=2): a LoRA column-parallel -> row-parallel pair, with and without
sequence parallel, against the same math on full tensors (outputs, input and adapter gradients).

Usage: ``lora_sp_worker.py OUT_DIR``; rank r writes ``OUT_DIR/rank{r}.txt`` with the worst relative
error per (mode, quantity). Megatron's finalize_model_grads sums the gradients of parameters marked
``sequence_parallel`` over TP; done here by hand, as it does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

S, B, H, F, R, ALPHA = 8, 2, 16, 24, 4, 8.0


def _full(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def run_mode(sp: bool, rank: int) -> dict:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mm_omni.lora.layers import add_lora

    cfg = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=2, tensor_model_parallel_size=2,
                            sequence_parallel=sp, use_cpu_initialization=True, gradient_accumulation_fusion=False)
    init = torch.nn.init.zeros_
    col = ColumnParallelLinear(H, F, config=cfg, init_method=init, bias=False, gather_output=False)
    row = RowParallelLinear(F, H, config=cfg, init_method=init, bias=False, input_is_parallel=True,
                            skip_bias_add=False)
    w1, w2, x, w_out = _full((F, H), 1), _full((H, F), 2), _full((S, B, H), 3), _full((S, B, H), 4)
    b1, b2 = _full((F, R), 5), _full((H, R), 6)
    add_lora(col, R, ALPHA, 0.0, torch.Generator().manual_seed(11))
    add_lora(row, R, ALPHA, 0.0, torch.Generator().manual_seed(12))
    a1 = col.lora_A.weight.detach().clone()  # replicated: the full A
    a2 = torch.cat([t.detach() for t in _gather(row.lora_A.weight, 1)], 1)  # split on the input
    with torch.no_grad():
        col.weight.copy_(w1.chunk(2, 0)[rank])
        row.weight.copy_(w2.chunk(2, 1)[rank])
        col.lora_B.weight.copy_(b1.chunk(2, 0)[rank])
        row.lora_B.weight.copy_(b2)
    for m in (col, row):
        m.weight.requires_grad_(False)

    seq = (lambda t: t.chunk(2, 0)[rank]) if sp else (lambda t: t)
    x_local = seq(x).clone().requires_grad_(True)
    y, _ = col(x_local)
    z, _ = row(y)
    # torch.autograd.backward, as megatron's schedules call it: Tensor.backward runs inside the CPU
    # adapter's TorchFunctionMode handler, where the mode is off (cuda device arguments would escape)
    torch.autograd.backward((z * seq(w_out)).sum())
    grads = {"col.A": col.lora_A.weight.grad, "col.B": col.lora_B.weight.grad,
             "row.A": row.lora_A.weight.grad, "row.B": row.lora_B.weight.grad}
    for key, m, p in (("col.A", col, col.lora_A.weight), ("row.B", row, row.lora_B.weight)):
        if getattr(p, "sequence_parallel", False):
            torch.distributed.all_reduce(grads[key])

    # the same on full tensors
    ref = {n: t.clone().requires_grad_(True) for n, t in dict(x=x, a1=a1, b1=b1, a2=a2, b2=b2).items()}
    s = ALPHA / R
    y_ref = ref["x"] @ w1.T + s * (ref["x"] @ ref["a1"].T) @ ref["b1"].T
    z_ref = y_ref @ w2.T + s * (y_ref @ ref["a2"].T) @ ref["b2"].T
    (z_ref * w_out).sum().backward()
    expect = {"out": seq(z_ref.detach()), "dx": seq(ref["x"].grad), "col.A": ref["a1"].grad,
              "col.B": ref["b1"].grad.chunk(2, 0)[rank], "row.A": ref["a2"].grad.chunk(2, 1)[rank],
              "row.B": ref["b2"].grad}
    got = dict(grads, out=z.detach(), dx=x_local.grad)
    return {k: float((got[k] - v).abs().max() / v.abs().max()) for k, v in expect.items()}


def _gather(t: torch.Tensor, dim: int) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(2)]
    torch.distributed.all_gather(parts, t.detach().contiguous())
    return parts


def main() -> None:
    from megatron.core import parallel_state, tensor_parallel

    from mm_omni.platform import get_platform

    get_platform()
    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    rank = parallel_state.get_tensor_model_parallel_rank()
    lines = []
    for sp in (False, True):
        for k, err in run_mode(sp, rank).items():
            lines.append(f"{'sp' if sp else 'tp'} {k} {err:.3e}")
    Path(sys.argv[1], f"rank{os.environ['RANK']}.txt").write_text("\n".join(lines))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
