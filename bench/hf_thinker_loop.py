"""transformers' Qwen2.5-Omni thinker in a plain training loop: bench/train_real.py's baseline.

``Qwen2_5OmniThinkerForConditionalGeneration`` (SDPA, bf16 weights, fused AdamW), fed the micro-batches it is
given, gradient accumulation to ``gbs`` rows per optimizer step. Full fine-tuning trains every parameter; with
``lora`` the thinker is wrapped by peft (``LoraConfig`` on the text decoder's linears that our target names
cover, everything else frozen) and AdamW steps the adapters alone. No gradient checkpointing (ours does not
recompute by default either).
"""

from __future__ import annotations

import gc
import time
from typing import Iterator, Optional, Sequence

import torch

from mm_omni.platform import get_platform, max_memory_allocated_gib, release_cached_memory, synchronize

HF_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "input_features",
           "feature_attention_mask")

# our megatron linear names -> the transformers decoder-layer linears they stand for (ours fuse q/k/v and gate/up
# into one linear, so one adapter of ours is two or three of peft's, each of rank r)
HF_LORA_TARGETS = {"linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                   "linear_proj": ("self_attn.o_proj",),
                   "linear_fc1": ("mlp.gate_proj", "mlp.up_proj"),
                   "linear_fc2": ("mlp.down_proj",)}


def hf_lora_leaves(targets: Sequence[str]) -> list[str]:
    """transformers' decoder-layer linear names for our ``--lora-targets`` (text decoder only)."""
    leaves = []
    for target in targets:
        name = target.removeprefix("text_decoder.")
        if name not in HF_LORA_TARGETS:
            raise SystemExit(f"--lora-targets {target!r}: the transformers side maps only the text decoder's "
                             f"{', '.join(HF_LORA_TARGETS)} (optionally as text_decoder.<name>); give those")
        leaves += [leaf for leaf in HF_LORA_TARGETS[name] if leaf not in leaves]
    return leaves


def hf_lora_modules(model: torch.nn.Module, targets: Sequence[str]) -> list[str]:
    """Full module names of the text decoder's linears for ``targets``: listed one by one, because the vision
    blocks have ``mlp.gate_proj`` / ``up_proj`` / ``down_proj`` and the audio layers ``self_attn.q_proj`` too."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniDecoderLayer

    leaves = hf_lora_leaves(targets)
    layers = [name for name, module in model.named_modules() if isinstance(module, Qwen2_5OmniDecoderLayer)]
    return [f"{layer}.{leaf}" for layer in layers for leaf in leaves]


def wrap_lora(model: torch.nn.Module, r: int, alpha: float, targets: Sequence[str], adapter_dtype: str):
    """peft LoRA on the decoder's linears, base frozen. ``adapter_dtype`` "fp32" is peft's default
    (``autocast_adapter_dtype``: bf16 adapters are upcast, their input cast to fp32); "bf16" keeps the base's."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                        target_modules=hf_lora_modules(model, targets))
    return get_peft_model(model, config, autocast_adapter_dtype=adapter_dtype == "fp32")


def run_hf(cfg, batches: Iterator[dict], steps: int, warmup: int, gbs: int, mbs: int,
           lora: Optional[dict] = None) -> dict:
    """``steps`` optimizer steps of ``gbs // mbs`` micro-batches from ``batches``; the first ``warmup`` untimed.

    ``lora``: ``dict(r=, alpha=, targets=, adapter_dtype=)`` or None (full fine-tuning).
    """
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration

    torch.manual_seed(0)
    dev = get_platform().device
    with torch.device(dev):
        model = Qwen2_5OmniThinkerForConditionalGeneration(cfg).to(torch.bfloat16)
    if lora is not None:
        model = wrap_lora(model, lora["r"], lora["alpha"], lora["targets"], lora["adapter_dtype"])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), weight_decay=0.0, fused=True)
    seconds, tokens, first_loss = 0.0, 0, None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        for step in range(steps):
            synchronize()
            start = time.perf_counter()
            step_tokens = 0
            for _ in range(gbs // mbs):
                batch = next(batches)
                inputs = {key: batch[key].to(dev, non_blocking=True) for key in HF_KEYS if key in batch}
                for key in ("pixel_values", "input_features"):
                    if key in inputs:
                        inputs[key] = inputs[key].to(torch.bfloat16)
                loss = model(**inputs).loss
                (loss * (mbs / gbs)).backward()
                if first_loss is None:
                    first_loss = float(loss.detach())
                step_tokens += int(batch["attention_mask"].sum())
            opt.step()
            opt.zero_grad(set_to_none=True)
            synchronize()
            if step >= warmup:
                seconds += time.perf_counter() - start
                tokens += step_tokens
        peak = max_memory_allocated_gib() if dev.type != "cpu" else None
    finally:  # also after an out-of-memory error: the next micro-batch size starts from an empty device
        del model, opt, params
        gc.collect()
        release_cached_memory()
    return dict(name="transformers" + (" + peft" if lora else ""), mbs=mbs, seconds=seconds, tokens=tokens,
                peak=peak, first_loss=first_loss, trainable=trainable)
