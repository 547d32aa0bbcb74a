"""Refusal of the Hugging Face Qwen2.5-Omni thinker config values whose math we do not implement.

:func:`from_hf_thinker_config <mm_omni.models.qwen2_5_omni.hf_config.from_hf_thinker_config>` carries every field that
changes transformers' math into model.json; :func:`check_thinker_config` runs first and refuses every
value we could not reproduce exactly, naming the field, its value and "not supported", before anything
is built or converted. docs/hf_config_audit.md lists every field of the config classes with what becomes
of it; tests/parity/test_hf_config_fields.py fails on a field transformers adds until it is listed there.
"""

from __future__ import annotations

from mm_omni.models.common.hf_activations import HF_ACTIVATIONS, TEXT_ROPE_TYPES


def check_thinker_config(thinker) -> None:
    """Raise one ``ValueError`` listing every unsupported value of a ``Qwen2_5OmniThinkerConfig``."""
    text, vision, audio = thinker.text_config, thinker.vision_config, thinker.audio_config
    problems = []
    for field, value in (("vision_config.hidden_act", vision.hidden_act),
                         ("text_config.hidden_act", text.hidden_act),
                         ("audio_config.activation_function", audio.activation_function)):
        if value not in HF_ACTIVATIONS:
            problems.append(f"{field}={value!r}: not supported (implemented: {', '.join(sorted(HF_ACTIVATIONS))})")

    # sliding-window attention: transformers windows every layer whose layer_types entry says so
    # (with use_sliding_window, the layers from max_window_layers on); we implement full attention only
    if text.use_sliding_window:
        problems.append(f"text_config.use_sliding_window={text.use_sliding_window!r}: not supported (sliding-window "
                        "attention is not implemented; set it to false)")
    windowed = [i for i, kind in enumerate(text.layer_types or []) if kind != "full_attention"]
    if windowed:
        kinds = sorted({text.layer_types[i] for i in windowed})
        problems.append(f"text_config.layer_types={list(text.layer_types)!r}: not supported (layers {windowed} are "
                        f"{', '.join(kinds)}; only 'full_attention' is implemented)")

    rope = text.rope_parameters or {}
    if rope.get("rope_type", "default") not in TEXT_ROPE_TYPES:
        problems.append(f"text_config.rope_parameters['rope_type']={rope.get('rope_type')!r}: not supported "
                        f"(implemented: {', '.join(TEXT_ROPE_TYPES)}, i.e. M-RoPE without scaling)")

    # head_dim is no declared field, but transformers reads one given as an extra key (text attention and
    # rotary; vision rotary only); ours is always hidden_size // heads
    for name, sub, heads in (("text_config", text, text.num_attention_heads),
                             ("vision_config", vision, vision.num_heads)):
        head_dim = getattr(sub, "head_dim", None)
        if head_dim is not None and head_dim != sub.hidden_size // heads:
            problems.append(f"{name}.head_dim={head_dim!r}: not supported (only hidden_size // heads = "
                            f"{sub.hidden_size // heads} is implemented; remove head_dim)")

    for field in ("patch_size", "temporal_patch_size"):
        value = getattr(vision, field)
        if not isinstance(value, int):
            problems.append(f"vision_config.{field}={value!r}: not supported (a single int is; transformers' "
                            "patch embedding takes one too)")

    # transformers' audio encoder stores these but never applies them: carrying a nonzero value over would
    # apply what transformers does not, dropping it would ignore what the config says; so it is refused
    for field in ("dropout", "attention_dropout", "activation_dropout"):
        value = getattr(audio, field)
        if value:
            problems.append(f"audio_config.{field}={value!r}: not supported (transformers' audio encoder never "
                            "applies it; set it to 0)")
    if audio.scale_embedding:
        problems.append(f"audio_config.scale_embedding={audio.scale_embedding!r}: not supported (transformers' "
                        "audio encoder never applies the scale; set it to false)")

    pad = text.pad_token_id
    if pad is not None and not -text.vocab_size <= pad < text.vocab_size:
        problems.append(f"text_config.pad_token_id={pad!r}: not supported (outside the vocabulary of "
                        f"{text.vocab_size}; torch's Embedding refuses it too)")
    if problems:
        raise ValueError("Qwen2.5-Omni thinker config:\n  " + "\n  ".join(problems))
