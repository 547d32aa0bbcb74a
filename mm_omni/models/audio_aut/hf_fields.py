"""Refusal of the Hugging Face AuT audio config values whose math we do not implement.

Read against transformers' ``Qwen3OmniMoeAudioEncoder``. Every field of ``Qwen3OmniMoeAudioEncoderConfig``
and what becomes of it:

* ``num_mel_bins``, ``encoder_layers``, ``encoder_attention_heads``, ``encoder_ffn_dim``, ``d_model``,
  ``output_dim``, ``max_source_positions``, ``downsample_hidden_size``, ``n_window_infer``: carried over
  (:func:`mm_omni.models.audio_aut.hf_config.from_hf_audio_config`);
* ``activation_function``: the blocks' MLP and the ``proj1 -> proj2`` activation, carried over when
  model.json can express it (the convolutions' GELU is the exact one whatever this says, in transformers too);
* ``n_window``: only values whose full chunk of ``2 * n_window`` frames gives 13 tokens (49..52), the
  count transformers' output-length rule assumes;
* ``n_window_infer``: at least one chunk (transformers divides by ``n_window_infer // (2 * n_window)``);
* ``conv_chunksize``: how many chunks one convolution call takes: memory only, honoured, same math;
* ``dropout``, ``attention_dropout``, ``activation_dropout``: stored but never applied by transformers:
  refused unless 0; ``scale_embedding``: never applied either: refused unless false;
* ``initializer_range``: initialisation only.

The LayerNorms' eps (torch's default 1e-5) has no config field: fixed in the adapter.
"""

from __future__ import annotations

from mm_omni.models.audio_aut.config import FULL_CHUNK_TOKENS, conv_frames
from mm_omni.models.common.hf_activations import HF_ACTIVATIONS


def check_audio_config(audio, name: str = "audio_config") -> None:
    """Raise one ``ValueError`` listing every unsupported value of a ``Qwen3OmniMoeAudioEncoderConfig``."""
    problems = []
    if audio.activation_function not in HF_ACTIVATIONS:
        problems.append(f"{name}.activation_function={audio.activation_function!r}: not supported (implemented: "
                        f"{', '.join(sorted(HF_ACTIVATIONS))})")
    for field in ("dropout", "attention_dropout", "activation_dropout"):
        value = getattr(audio, field)
        if value:
            problems.append(f"{name}.{field}={value!r}: not supported (transformers' AuT encoder never applies it; "
                            "set it to 0)")
    if audio.scale_embedding:
        problems.append(f"{name}.scale_embedding={audio.scale_embedding!r}: not supported (transformers' AuT "
                        "encoder never applies the scale; set it to false)")
    tokens = conv_frames(2 * audio.n_window)
    if tokens != FULL_CHUNK_TOKENS:
        problems.append(f"{name}.n_window={audio.n_window!r}: not supported (a chunk of {2 * audio.n_window} frames "
                        f"gives {tokens} tokens, transformers' output-length rule counts {FULL_CHUNK_TOKENS}; "
                        "use 49..52)")
    if audio.n_window_infer < 2 * audio.n_window:
        problems.append(f"{name}.n_window_infer={audio.n_window_infer!r}: not supported (shorter than one chunk of "
                        f"2 * n_window = {2 * audio.n_window} frames; transformers divides by zero)")
    if audio.d_model % audio.encoder_attention_heads:
        problems.append(f"{name}.encoder_attention_heads={audio.encoder_attention_heads!r}: not supported (must "
                        f"divide d_model={audio.d_model})")
    if problems:
        raise ValueError("AuT audio config:\n  " + "\n  ".join(problems))
