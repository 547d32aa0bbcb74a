"""Refusal of the Hugging Face Qwen3-VL-style vision config values whose math we do not implement.

Read against transformers' ``Qwen3OmniMoeVisionEncoder`` (the same fields as Qwen3-VL's vision config).
Every field and what becomes of it:

* ``depth``, ``hidden_size``, ``intermediate_size``, ``num_heads``, ``in_channels``, ``spatial_merge_size``,
  ``out_hidden_size``: carried over (:func:`mm_omni.models.vision_qwen3.hf_config.from_hf_vision_config`);
* ``hidden_act``: the blocks' MLP activation, carried over when model.json can express it (the mergers'
  GELU is the exact one whatever this says, in transformers too);
* ``patch_size``, ``temporal_patch_size``: one int each (transformers' Conv3d kernel takes one);
* ``num_position_embeddings``: the learned table; transformers resamples its first
  ``int(sqrt(n)) ** 2`` rows as a square grid, and so do we;
* ``deepstack_visual_indexes``: each a layer in ``[0, depth)``, each once (transformers builds a merger
  per entry but a layer outside the range, or a repeated one, leaves its merger unused);
* ``rope_parameters``: ``rope_type`` must be ``axial`` (transformers refuses anything else), ``rope_theta``
  is carried over;
* ``head_dim`` (no declared field; transformers' rotary reads one given as an extra key, its attention
  never does): only ``hidden_size // num_heads``;
* ``initializer_range``: initialisation only, no effect on the math of given weights.

The norms' eps (1e-6) and the merger activation have no config field in transformers: fixed in the adapter.
"""

from __future__ import annotations

from mm_omni.models.common.hf_activations import HF_ACTIVATIONS


def check_vision_config(vision, name: str = "vision_config") -> None:
    """Raise one ``ValueError`` listing every unsupported value of a Qwen3-VL-style vision config."""
    problems = []
    if vision.hidden_act not in HF_ACTIVATIONS:
        problems.append(f"{name}.hidden_act={vision.hidden_act!r}: not supported (implemented: "
                        f"{', '.join(sorted(HF_ACTIVATIONS))})")
    for field in ("patch_size", "temporal_patch_size"):
        value = getattr(vision, field)
        if not isinstance(value, int):
            problems.append(f"{name}.{field}={value!r}: not supported (a single int is; transformers' patch "
                            "embedding takes one too)")
    rope = getattr(vision, "rope_parameters", None) or {}
    if rope.get("rope_type", "axial") != "axial":
        problems.append(f"{name}.rope_parameters['rope_type']={rope.get('rope_type')!r}: not supported (the 2D "
                        "rotary is 'axial', the only type transformers accepts here)")
    head_dim = getattr(vision, "head_dim", None)
    if head_dim is not None and head_dim != vision.hidden_size // vision.num_heads:
        problems.append(f"{name}.head_dim={head_dim!r}: not supported (only hidden_size // num_heads = "
                        f"{vision.hidden_size // vision.num_heads} is implemented; remove head_dim)")
    indexes = list(vision.deepstack_visual_indexes)
    outside = [i for i in indexes if not 0 <= i < vision.depth]
    if outside:
        problems.append(f"{name}.deepstack_visual_indexes={indexes!r}: not supported (layers {outside} are not in "
                        f"[0, depth={vision.depth}); their mergers would never be used)")
    if len(set(indexes)) != len(indexes):
        problems.append(f"{name}.deepstack_visual_indexes={indexes!r}: not supported (a layer listed twice leaves "
                        "a merger unused; list each layer once)")
    side = int(vision.num_position_embeddings ** 0.5)
    if side < 1:
        problems.append(f"{name}.num_position_embeddings={vision.num_position_embeddings!r}: not supported (the "
                        "learned grid needs at least one entry)")
    if problems:
        raise ValueError("Qwen3 vision config:\n  " + "\n  ".join(problems))
