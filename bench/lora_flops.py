"""The FLOPs a LoRA step executes on an omni micro-batch: bench/train_real.py's MFU for ``--lora``.

Full fine-tuning's model FLOPs are 3x the forward (:mod:`mm_omni.models.omni_flops`). With LoRA on the text
decoder the frozen base computes its forward and the gradient of its activations but no weight gradient:

* decoder linears and the output layer (frozen): 2x the forward, 4 * N * tokens (instead of 6 * N * tokens);
* decoder attention core (no weights): 3x the forward, as in full fine-tuning (causal mask halves it);
* adapters (trained): 3x their forward, 6 * N_lora * tokens, N_lora = r * (in + out) per adapted linear (ours: one
  adapter per fused linear; peft's two or three on q/k/v and gate/up add r * in each, under 0.1 % here);
* encoders (frozen, no adapter, their output needs no gradient): the forward alone.

Elementwise work is left out, as in the full fine-tuning count; so is the one gradient autograd skips (the first
decoder layer's ``linear_qkv`` input, the embeddings, needs none).
"""

from __future__ import annotations

from typing import Sequence

from mm_omni.models.omni_flops import omni_batch_flops
from mm_omni.models.text.flops import row_lengths, text_flops

FORMULA = ("LoRA FLOPs executed: frozen decoder linears + output layer 4*N*tokens (forward + activation "
           "gradient), attention core 3x its forward, adapters 6*N_lora*tokens, frozen encoders their forward "
           "2*N*tokens")


def decoder_linear_shapes(text) -> dict[str, tuple[int, int]]:
    """``(in, out)`` of the decoder layer's megatron linears (gated MLP: ``linear_fc1`` = gate + up)."""
    h, f = text.hidden_size, text.ffn_hidden_size
    kv = h // text.num_attention_heads * text.num_query_groups
    return {"linear_qkv": (h, h + 2 * kv), "linear_proj": (h, h), "linear_fc1": (h, 2 * f), "linear_fc2": (f, h)}


def lora_batch_flops(model_cfg, batch: dict, r: int, targets: Sequence[str]) -> float:
    """FLOPs one LoRA forward + backward executes on ``batch`` (adapters on the decoder's ``targets``)."""
    text = model_cfg.text_decoder
    lengths = row_lengths(batch)
    tokens, h, layers = sum(lengths), text.hidden_size, text.num_layers
    encoders_fwd = (omni_batch_flops(model_cfg, batch) - text_flops(text, lengths)) / 3
    shapes = decoder_linear_shapes(text)
    base_fwd = sum(2 * i * o for i, o in shapes.values())  # per token and layer
    lora_fwd = sum(2 * r * sum(shapes[t.removeprefix("text_decoder.")]) for t in targets)
    attention_fwd = sum(2 * s * s * h for s in lengths)
    head_fwd = 2 * h * text.vocab_size
    return (layers * (2 * tokens * base_fwd + 3 * attention_fwd + 3 * tokens * lora_fwd) + 2 * tokens * head_fwd
            + encoders_fwd)
