"""Refusal of the Hugging Face Qwen3-Omni thinker config values whose math we do not implement.

:func:`~mm_omni.models.qwen3_omni_moe.hf_config.from_hf_thinker_config` carries every field that changes
transformers' math into model.json; :func:`check_thinker_config` runs first and refuses, by name, every value
we could not reproduce exactly. The vision and audio configs are checked by their stacks' checks
(:mod:`mm_omni.models.vision_qwen3.hf_fields`, :mod:`mm_omni.models.audio_aut.hf_fields`); here the text
config of ``Qwen3OmniMoeTextConfig``:

* sizes, ``rms_norm_eps``, ``hidden_act``, ``attention_bias``, ``attention_dropout``, ``head_dim``,
  ``initializer_range``, ``pad_token_id``: carried over;
* experts: ``num_experts``, ``num_experts_per_tok``, ``moe_intermediate_size``, ``norm_topk_prob``,
  ``decoder_sparse_step`` / ``mlp_only_layers`` (which layers are sparse), ``router_aux_loss_coef``
  (:mod:`mm_omni.models.text.moe` says how megatron's per-layer loss is scaled to it): carried over;
* ``rope_parameters``: M-RoPE without scaling (``rope_type`` default), ``mrope_section`` summing to
  ``head_dim / 2``, interleaved (``interleaved`` / ``mrope_interleaved`` true: transformers' Qwen3-Omni
  text rotary interleaves whatever they say, and so do we; a false value is refused rather than ignored);
* ``sliding_window``: refused unless null (transformers' Qwen3-Omni text attention has no window; a value
  would be expected to mean one);
* ``output_router_logits``: whether transformers adds its pooled aux loss to the returned loss; we always
  train with megatron's per-layer loss (scaled as above): accepted;
* ``use_cache``, ``bos/eos_token_id``: generation only.

Thinker fields: the token ids and ``position_id_per_seconds`` are carried over, ``tie_word_embeddings``
decides the output layer, ``user_token_id`` and ``initializer_range`` change no training math.
"""

from __future__ import annotations

from mm_omni.models.audio_aut.hf_fields import check_audio_config
from mm_omni.models.common.hf_activations import HF_ACTIVATIONS, TEXT_ROPE_TYPES
from mm_omni.models.vision_qwen3.hf_fields import check_vision_config


def head_dim(text) -> int:
    """The attention head size: ``head_dim`` where the config has one (the released one does), else
    hidden_size / heads (transformers' rule)."""
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def text_problems(text, name: str = "text_config") -> list[str]:
    problems = []
    if text.hidden_act not in HF_ACTIVATIONS:
        problems.append(f"{name}.hidden_act={text.hidden_act!r}: not supported (implemented: "
                        f"{', '.join(sorted(HF_ACTIVATIONS))})")
    if getattr(text, "sliding_window", None) is not None:
        problems.append(f"{name}.sliding_window={text.sliding_window!r}: not supported (sliding-window attention "
                        "is not implemented; set it to null)")
    rope = text.rope_parameters or {}
    if rope.get("rope_type", "default") not in TEXT_ROPE_TYPES:
        problems.append(f"{name}.rope_parameters['rope_type']={rope.get('rope_type')!r}: not supported "
                        f"(implemented: {', '.join(TEXT_ROPE_TYPES)}, i.e. M-RoPE without scaling)")
    section = rope.get("mrope_section")
    if not section or len(section) != 3:
        problems.append(f"{name}.rope_parameters['mrope_section']={section!r}: not supported (three sections, "
                        "temporal / height / width, are needed)")
    elif 2 * sum(section) != head_dim(text):
        problems.append(f"{name}.rope_parameters['mrope_section']={section!r}: not supported (sums to "
                        f"{sum(section)}, head_dim / 2 is {head_dim(text) // 2})")
    for key in ("interleaved", "mrope_interleaved"):
        if rope.get(key) is False:
            problems.append(f"{name}.rope_parameters['{key}']=False: not supported (transformers' Qwen3-Omni "
                            "rotary always interleaves the sections; remove the key or set it to true)")
    if not text.num_experts or not any(i not in text.mlp_only_layers and (i + 1) % text.decoder_sparse_step == 0
                                       for i in range(text.num_hidden_layers)):
        problems.append(f"{name}.num_experts={text.num_experts!r} / decoder_sparse_step={text.decoder_sparse_step!r}"
                        f" / mlp_only_layers={text.mlp_only_layers!r}: not supported (no layer would be sparse; the "
                        "load-balancing loss needs at least one MoE layer)")
    pad = text.pad_token_id
    if pad is not None and not -text.vocab_size <= pad < text.vocab_size:
        problems.append(f"{name}.pad_token_id={pad!r}: not supported (outside the vocabulary of {text.vocab_size})")
    return problems


def check_thinker_config(thinker) -> None:
    """Raise one ``ValueError`` listing every unsupported value of a ``Qwen3OmniMoeThinkerConfig``."""
    problems = text_problems(thinker.text_config)
    for check, sub in ((check_vision_config, thinker.vision_config), (check_audio_config, thinker.audio_config)):
        try:
            check(sub)
        except ValueError as err:
            problems += [line.strip() for line in str(err).splitlines()[1:]]
    if problems:
        raise ValueError("Qwen3-Omni thinker config:\n  " + "\n  ".join(problems))
