"""torchrun worker: at TP=2 (vocab split 2/2, with and without sequence parallelism) the chunked fused
loss gives the full-logits path's per-token loss and gradients (gloo on CPU, fp32)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from mm_omni.platform import get_platform

TOL = 1e-5


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def main() -> None:
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mm_omni.models.text.fused_loss import output_layer_lm_loss
    from mm_omni.models.text.loss import vocab_parallel_lm_loss

    get_platform()
    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    rank, s, b, h, v = dist.get_rank(), 12, 2, 16, 64
    gen = torch.Generator().manual_seed(0)
    full_w = torch.randn(v, h, generator=gen)
    full_x = torch.randn(s, b, h, generator=gen)
    targets = torch.randint(0, v, (b, s), generator=gen)
    targets[0, :3] = -100
    upstream = torch.randn(b, s, generator=gen)
    for sp in (False, True):
        cfg = TransformerConfig(num_layers=1, hidden_size=h, num_attention_heads=2, tensor_model_parallel_size=2,
                                sequence_parallel=sp, use_cpu_initialization=True)
        layer = tensor_parallel.ColumnParallelLinear(h, v, config=cfg, init_method=torch.nn.init.zeros_, bias=False,
                                                     gather_output=False)
        with torch.no_grad():
            layer.weight.copy_(full_w.chunk(2)[rank])
        x_in = full_x.chunk(2)[rank] if sp else full_x  # sequence parallel: this rank's rows
        results = []
        for fused in (False, True):
            x = x_in.clone().requires_grad_()
            layer.weight.grad = None
            if fused:
                loss, mask = output_layer_lm_loss(layer, x, None, targets, -100)
            else:
                logits, _ = layer(x)
                mask = targets != -100
                loss, mask = vocab_parallel_lm_loss(logits, targets.masked_fill(~mask, -100))
            (loss * upstream).sum().backward()
            results.append((loss.detach(), x.grad, layer.weight.grad.clone()))
        (l0, gx0, gw0), (l1, gx1, gw1) = results
        errs = (rel_err(l1, l0), rel_err(gx1, gx0), rel_err(gw1, gw0))
        assert max(errs) < TOL, (sp, errs)
    if rank == 0:
        print("FUSED_LOSS_TP_OK")


if __name__ == "__main__":
    main()
