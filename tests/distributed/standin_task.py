"""A tiny stand-in model + synthetic data for the training-loop tests (no omni model needed).

The model is megatron-core's ``GPTModel`` with the project's layer spec (CoreAttention), untied
embeddings, RoPE, a plain GELU MLP. Its weights are initialised from a seed derived from each
parameter's *global* name and then cut to this rank's tensor-parallel shard, so TP=1, TP=2, PP=2 and
DP=2 runs start from the same model (megatron's own init depends on the layout: per-stage seeds).
The GELU MLP (not SwiGLU) keeps "full tensor, contiguous TP split" exact: a fused gate/up weight is
split per half, not contiguously.

Sample ``i`` of the synthetic dataset is a deterministic function of ``i``, so a run resumed at
``consumed_samples`` sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import zlib

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from mm_omni.models.common.layer_spec import transformer_block_spec
from mm_omni.parallel.context_parallel import split_for_context_parallel
from mm_omni.training.task import TrainTask

VOCAB, HIDDEN, HEADS, LAYERS, SEQ = 64, 32, 4, 4, 16


def standin_config(args, num_layers: int = LAYERS) -> TransformerConfig:
    return TransformerConfig(
        num_layers=num_layers, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=2 * HIDDEN,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.vpp_size,
        sequence_parallel=args.sequence_parallel, context_parallel_size=args.context_parallel_size,
        normalization="RMSNorm", add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        gradient_accumulation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
    )


def _global_name(name: str, model: GPTModel) -> str:
    """'decoder.layers.0.x' on stage 1 -> 'decoder.layers.<global index>.x'."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


@torch.no_grad()
def init_by_name(model: GPTModel, tp_size: int, tp_rank: int) -> None:
    for name, p in model.named_parameters():
        gen = torch.Generator().manual_seed(zlib.crc32(_global_name(name, model).encode()))
        if name.endswith("layernorm.weight"):
            full = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            p.copy_(full)
            continue
        shape, dim = list(p.shape), getattr(p, "partition_dim", -1)
        split = getattr(p, "tensor_model_parallel", False) and dim >= 0
        if split:
            shape[dim] *= tp_size
        full = 0.05 * torch.randn(shape, generator=gen)
        p.copy_(full.chunk(tp_size, dim)[tp_rank] if split else full)


def sample(i: int) -> torch.Tensor:
    """Synthetic sample ``i``: tokens following a noisy pattern the model can learn."""
    gen = torch.Generator().manual_seed(1000 + i)
    start = torch.randint(0, VOCAB, (1,), generator=gen)
    tokens = (start + 3 * torch.arange(SEQ + 1)) % VOCAB
    noise = torch.rand(SEQ + 1, generator=gen) < 0.2
    return torch.where(noise, torch.randint(0, VOCAB, (SEQ + 1,), generator=gen), tokens)


def micro_batches(args, consumed: int):
    """Megatron's pretraining sampler: global batch = DP slices of ``mbs`` consecutive samples."""
    dp_rank = parallel_state.get_data_parallel_rank()
    mbs, dp = args.micro_batch_size, args.data_parallel_size
    n = consumed
    while True:
        for _ in range(args.num_microbatches):
            idx = range(n + dp_rank * mbs, n + (dp_rank + 1) * mbs)
            rows = torch.stack([sample(i) for i in idx])
            labels = rows[:, 1:].clone()
            labels[:, :2] = -100  # some ignored targets: exercises the loss mask
            # variable number of label tokens per row: exercises the loss modes
            for r, i in enumerate(idx):
                labels[r, SEQ - (i % 5):] = -100
            yield {"input_ids": rows[:, :-1], "labels": labels}
            n += mbs * dp


class _Out:
    def __init__(self, per_token_loss, loss_mask):
        self.per_token_loss, self.loss_mask = per_token_loss, loss_mask


def forward(model, batch):
    inner = model.module if hasattr(model, "module") else model
    ids, labels = batch["input_ids"], batch["labels"]
    mask = (labels != -100)
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    # CP: this rank's zig-zag share of the (already shifted) tokens; megatron's rotary slices its table
    # the same way, and the attention core builds the matching causal mask over the gathered keys
    split = split_for_context_parallel(parallel_state.get_context_parallel_group(), ids.shape[1])
    if split is not None:
        ids, labels, mask, pos = (split.take(t, 1) for t in (ids, labels, mask, pos))
    out = model(ids, pos, None, labels=labels.masked_fill(~mask, 0))
    if not inner.post_process:
        return out
    return _Out(out * mask, mask.float())


def standin_task(args, freeze_prefixes: tuple = ()) -> TrainTask:
    """``freeze_prefixes``: parameter-name prefixes to freeze (what model.json's ``freeze`` does)."""
    num_layers = int(args.num_layers) if args.num_layers else LAYERS

    def provider(pre_process, post_process, vp_stage):
        config = standin_config(args, num_layers)
        model = GPTModel(
            config=config, transformer_layer_spec=transformer_block_spec(config, AttnMaskType.causal, vp_stage),
            vocab_size=VOCAB, max_sequence_length=SEQ, pre_process=pre_process, post_process=post_process,
            share_embeddings_and_output_weights=False, position_embedding_type="rope", vp_stage=vp_stage)
        init_by_name(model, parallel_state.get_tensor_model_parallel_world_size(),
                     parallel_state.get_tensor_model_parallel_rank())
        for name, p in model.named_parameters():
            if any(_global_name(name, model).startswith(f) for f in freeze_prefixes):
                p.requires_grad_(False)
        return model

    return TrainTask(name="standin", model_provider=provider, forward=forward,
                     data_iterator=lambda consumed: micro_batches(args, consumed), seq_length=SEQ)
