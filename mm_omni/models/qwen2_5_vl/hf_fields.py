"""Refusal of the Hugging Face Qwen2.5-VL config values whose math we do not implement.

:func:`config_from_hf <mm_omni.models.qwen2_5_vl.hf_config.config_from_hf>` carries every field that changes
transformers' math into model.json; :func:`check_vl_config` runs first and refuses every value we could not
reproduce exactly, naming the field, its value and "not supported", before anything is built or converted.
docs/hf_config_audit_qwen2_5_vl.md lists every field of the config classes with what becomes of it;
tests/parity/test_qwen2_5_vl_hf_config.py fails on a field transformers adds until it is listed there.
"""

from __future__ import annotations

from mm_omni.models.common.hf_activations import HF_ACTIVATIONS, TEXT_ROPE_TYPES


def check_vl_config(config) -> None:
    """Raise one ``ValueError`` listing every unsupported value of a ``Qwen2_5_VLConfig``."""
    text, vision = config.text_config, config.vision_config
    problems = []
    for field, value in (("vision_config.hidden_act", vision.hidden_act), ("text_config.hidden_act", text.hidden_act)):
        if value not in HF_ACTIVATIONS:
            problems.append(f"{field}={value!r}: not supported (implemented: {', '.join(sorted(HF_ACTIVATIONS))})")

    # sliding-window attention: transformers windows every layer whose layer_types entry says so (with
    # use_sliding_window, the layers from max_window_layers on); we implement full attention only
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
    vision_rope = vision.rope_parameters or {}
    if vision_rope.get("rope_type", "axial") != "axial":
        problems.append(f"vision_config.rope_parameters['rope_type']={vision_rope.get('rope_type')!r}: not supported "
                        "(the vision encoder's 2D rotary is 'axial', as transformers' is)")

    # head_dim is no declared field, but transformers reads one given as an extra key in the rotary of both
    # stacks (the attention always uses hidden_size // heads); ours is always hidden_size // heads
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

    pad = text.pad_token_id
    if pad is not None and not -text.vocab_size <= pad < text.vocab_size:
        problems.append(f"text_config.pad_token_id={pad!r}: not supported (outside the vocabulary of "
                        f"{text.vocab_size}; torch's Embedding refuses it too)")
    if problems:
        raise ValueError("Qwen2.5-VL config:\n  " + "\n  ".join(problems))
