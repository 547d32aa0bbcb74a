"""What a LoRA run's checkpoint weighs next to its base, computed from the shapes (nothing is saved).

    python -m mm_omni.lora.sizes      # Qwen2.5-Omni-7B's thinker, rank 8 on the text decoder

A combined save holds the whole (frozen) thinker plus the adapters and their optimizer state; an
adapter-only save (what every LoRA save is now) holds the adapters and their optimizer state alone.
megatron's mixed-precision Adam keeps, per trained parameter, an fp32 main copy, ``exp_avg`` and
``exp_avg_sq``: 12 bytes (RNG states, args and the scheduler add a few kB).
"""

from __future__ import annotations

TEXT_LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
ADAM_BYTES = 12  # fp32 main param + exp_avg + exp_avg_sq


def text_linear_shapes(text) -> dict[str, tuple[int, int]]:
    """``(in, out)`` of each megatron linear of one decoder layer (gated MLP: ``linear_fc1`` = gate + up)."""
    heads, groups, hidden = text.num_attention_heads, text.num_key_value_heads, text.hidden_size
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return {"linear_qkv": (hidden, (heads + 2 * groups) * head_dim), "linear_proj": (heads * head_dim, hidden),
            "linear_fc1": (hidden, 2 * text.intermediate_size), "linear_fc2": (text.intermediate_size, hidden)}


def text_lora_params(text, r: int, targets=TEXT_LINEARS) -> int:
    """``A [r, in]`` + ``B [out, r]`` of every targeted linear of every decoder layer."""
    shapes = text_linear_shapes(text)
    return text.num_hidden_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


def thinker_params(thinker) -> int:
    """Parameters of the whole thinker (text, vision, audio) as transformers builds it, on the meta device."""
    import torch
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration

    with torch.device("meta"):
        return sum(p.numel() for p in Qwen2_5OmniThinkerForConditionalGeneration(thinker).parameters())


def checkpoint_bytes(thinker, r: int, weight_bytes: int = 2, targets=TEXT_LINEARS) -> dict[str, int]:
    base = thinker_params(thinker)
    lora = text_lora_params(thinker.text_config, r, targets)
    adapter_only = lora * (weight_bytes + ADAM_BYTES)
    return {"base_params": base, "lora_params": lora, "base_bytes": base * weight_bytes,
            "lora_weight_bytes": lora * weight_bytes, "lora_optimizer_bytes": lora * ADAM_BYTES,
            "adapter_only_bytes": adapter_only, "combined_bytes": base * weight_bytes + adapter_only}


def qwen2_5_omni_7b_thinker():
    """The 7B thinker's shapes (its config.json's values; token ids and rope do not change any shape)."""
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniThinkerConfig

    return Qwen2_5OmniThinkerConfig(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=3584),
        audio_config=dict(encoder_layers=32, d_model=1280, encoder_attention_heads=20, encoder_ffn_dim=5120,
                          num_mel_bins=128, output_dim=3584),
        tie_word_embeddings=False)


def main() -> None:
    sizes = checkpoint_bytes(qwen2_5_omni_7b_thinker(), r=8)
    print(f"Qwen2.5-Omni-7B thinker, LoRA r=8 on {', '.join(TEXT_LINEARS)} of the text decoder, bf16 weights:")
    print(f"  base: {sizes['base_params']:,} parameters = {sizes['base_bytes'] / 2**30:.2f} GiB")
    print(f"  adapters: {sizes['lora_params']:,} parameters = {sizes['lora_weight_bytes'] / 2**20:.1f} MiB, "
          f"their Adam state {sizes['lora_optimizer_bytes'] / 2**20:.1f} MiB")
    print(f"  adapter-only save: {sizes['adapter_only_bytes'] / 2**20:.1f} MiB; combined save: "
          f"{sizes['combined_bytes'] / 2**30:.2f} GiB ({sizes['combined_bytes'] / sizes['adapter_only_bytes']:.0f}x)")


if __name__ == "__main__":
    main()
