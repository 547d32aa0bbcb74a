"""Attention core and decoder-layer benchmark (run it on a machine with a CUDA GPU).

Prints, all measured in this one run on the same inputs:
  1. our CoreAttention vs raw SDPA (cuDNN and flash backends) on 7B-width attention, fwd+bwd;
     packed sequences: our core vs raw ``varlen_attn``;
  2. a stack of four 7B-width Qwen2 decoder layers (M-RoPE, GQA, SwiGLU), fwd+bwd in bf16:
     megatron-core TransformerBlock with our layer spec vs transformers' Qwen2.5-Omni decoder layers.

    python bench/attention.py [--seq 4096 --batch 1 --layers 4 --iters 20]
"""

from __future__ import annotations

import argparse
import functools
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mm_omni.platform import get_platform
from timing import timeit as _timeit  # bench/timing.py

timeit = functools.partial(_timeit, warmup=5)


def fwd_bwd(fn, *inputs):
    def run():
        for t in inputs:
            t.grad = None
        out = fn()
        out.backward(torch.ones_like(out))
    return run


def attention_rows(args, dev, dtype):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from mm_omni.models.common.attention import CoreAttention, packed_params, varlen_attention

    b, s, hq, hkv, d = args.batch, args.seq, 28, 4, 128
    cfg = TransformerConfig(num_layers=1, hidden_size=hq * d, num_attention_heads=hq, num_query_groups=hkv,
                            attention_dropout=0.0, bf16=True, params_dtype=dtype)
    core = CoreAttention(cfg, 1, AttnMaskType.causal)
    q = torch.randn(s, b, hq, d, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(s, b, hkv, d, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(s, b, hkv, d, device=dev, dtype=dtype, requires_grad=True)
    # raw SDPA on its preferred [b, h, s, d] layout with K/V expanded to all heads
    qr = q.detach().permute(1, 2, 0, 3).contiguous().requires_grad_()
    kr = k.detach().permute(1, 2, 0, 3).repeat_interleave(hq // hkv, 1).contiguous().requires_grad_()
    vr = v.detach().permute(1, 2, 0, 3).repeat_interleave(hq // hkv, 1).contiguous().requires_grad_()

    def raw(backend):
        def f():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qr, kr, vr, is_causal=True)
        return f

    rows = {}
    for name, backend in (("raw SDPA cuDNN", SDPBackend.CUDNN_ATTENTION), ("raw SDPA flash", SDPBackend.FLASH_ATTENTION)):
        try:
            rows[name] = timeit(fwd_bwd(raw(backend), qr, kr, vr), args.iters)
        except RuntimeError as err:  # a backend may not support this shape/GPU
            print(f"  {name}: unavailable ({str(err).splitlines()[0][:80]})")
    rows["mm_omni CoreAttention (padded)"] = timeit(
        fwd_bwd(lambda: core(q, k, v, None), q, k, v), args.iters)

    # packed: b rows of s tokens as one sequence with cu_seqlens
    t = b * s
    qp = torch.randn(t, 1, hq, d, device=dev, dtype=dtype, requires_grad=True)
    kp = torch.randn(t, 1, hkv, d, device=dev, dtype=dtype, requires_grad=True)
    vp = torch.randn(t, 1, hkv, d, device=dev, dtype=dtype, requires_grad=True)
    cu = torch.arange(0, t + 1, s, device=dev, dtype=torch.int32)
    params = packed_params(cu)
    rows["raw varlen_attn (packed)"] = timeit(fwd_bwd(
        lambda: varlen_attention(qp[:, 0], kp[:, 0], vp[:, 0], cu, s, True),
        qp, kp, vp), args.iters)
    rows["mm_omni CoreAttention (packed)"] = timeit(
        fwd_bwd(lambda: core(qp, kp, vp, None, packed_seq_params=params), qp, kp, vp), args.iters)
    return rows


def decoder_rows(args, dev, dtype):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_block import TransformerBlock
    from megatron.core.transformer.transformer_config import TransformerConfig
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniTextConfig
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as hf

    from mm_omni.models.common.layer_spec import transformer_layer_spec
    from mm_omni.models.common.rotary import mrope_freqs

    b, s, hidden, ffn, heads, groups, section = args.batch, args.seq, 3584, 18944, 28, 4, [16, 24, 24]
    tokens = b * s
    cfg = TransformerConfig(
        num_layers=args.layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
        num_query_groups=groups, normalization="RMSNorm", layernorm_epsilon=1e-6, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=True, hidden_dropout=0.0,
        attention_dropout=0.0, bf16=True, params_dtype=dtype, bias_activation_fusion=True,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
    )
    # as megatron's Float16Module does in training: every parameter (norms too) in bf16
    ours = TransformerBlock(cfg, transformer_layer_spec(AttnMaskType.causal), post_layer_norm=False).to(dev, dtype)
    pos = torch.arange(s, device=dev).expand(3, b, s)
    freqs = mrope_freqs(pos, hidden // heads, section, 1e6)
    x = torch.randn(s, b, hidden, device=dev, dtype=dtype, requires_grad=True)
    t_ours = timeit(fwd_bwd(lambda: ours(x, attention_mask=None, rotary_pos_emb=freqs), x), args.iters)
    mem_ours = torch.cuda.max_memory_allocated() / 2**30
    ours = None  # free it before the next model
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

    hcfg = Qwen2_5OmniTextConfig(
        hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads, num_key_value_heads=groups,
        num_hidden_layers=args.layers, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
    )
    hcfg._attn_implementation = "sdpa"
    layers = torch.nn.ModuleList(hf.Qwen2_5OmniDecoderLayer(hcfg, i) for i in range(args.layers)).to(dev, dtype)
    rotary = hf.Qwen2_5OmniRotaryEmbedding(hcfg).to(dev)
    xh = torch.randn(b, s, hidden, device=dev, dtype=dtype, requires_grad=True)
    pos_emb = rotary(xh, pos)

    def hf_step():
        h = xh
        for layer in layers:
            out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pos_emb)
            h = out[0] if isinstance(out, tuple) else out
        return h

    t_hf = timeit(fwd_bwd(hf_step, xh), args.iters)
    mem_hf = torch.cuda.max_memory_allocated() / 2**30
    # matmul FLOPs (fwd+bwd = 3x fwd): linear layers + causal attention (half the score matrix)
    per_layer_params = hidden * (hidden + 2 * groups * hidden // heads) + hidden * hidden + 3 * hidden * ffn
    flops = 3 * (2 * tokens * per_layer_params + 2 * 2 * b * s * s * hidden / 2) * args.layers
    return (t_ours, mem_ours, t_hf, mem_hf, tokens, flops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if get_platform().name != "cuda":
        raise SystemExit("bench/attention.py needs a CUDA GPU (run it on a GPU machine)")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    print(f"GPU: {torch.cuda.get_device_name()} | torch {torch.__version__} | batch {args.batch} x seq {args.seq} | bf16 fwd+bwd")

    rows = attention_rows(args, dev, dtype)
    base = min(v for k, v in rows.items() if k.startswith("raw SDPA"))
    print("\n1) attention core, 28 q heads / 4 kv groups / head dim 128, causal")
    print(f"  {'kernel':34s} {'ms':>8s} {'vs best raw SDPA':>17s}")
    for name, ms in rows.items():
        ref = rows["raw varlen_attn (packed)"] if "packed" in name else base
        print(f"  {name:34s} {ms:8.3f} {ref / ms:16.3f}x")

    t_ours, mem_ours, t_hf, mem_hf, tokens, flops = decoder_rows(args, dev, dtype)
    print(f"\n2) {args.layers} decoder layers at 7B width (3584/18944/28 heads/4 groups), M-RoPE")
    print(f"  {'stack':34s} {'ms':>8s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'peak GiB':>9s}")
    for name, ms, mem in (("transformers Qwen2.5-Omni layers", t_hf, mem_hf), ("mm_omni megatron-core block", t_ours, mem_ours)):
        print(f"  {name:34s} {ms:8.2f} {tokens / ms * 1e3:10.0f} {flops / ms / 1e9:8.1f} {mem:9.1f}")
    print(f"  ratio (ours / transformers tokens/s): {t_hf / t_ours:.3f}x")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
