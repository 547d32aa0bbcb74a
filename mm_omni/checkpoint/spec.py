"""What a model family declares to get ``mm-convert <Converter> hf_to_mm | mm_to_hf | resplit``.

The converter (``converters/common``) is written once; a family gives a :class:`ConverterSpec` (in its
folder, e.g. ``mm_omni/models/<family>/convert.py``) and exposes
``converters.common.converter.converter_class(SPEC, "<help text>")`` (e.g. in its ``converter.py``) as its
registry ``converter_ref``. All callables take the *sub-config*: the transformers config of the model that
is converted (``sub_config`` of the full config, e.g. Qwen2.5-Omni's ``thinker_config``). Parity tests
convert state dicts in memory through the same table with ``converters.common.convert.hf_state_to_mm``.

:class:`ConverterSpec` fields
    ``converter``       the ``mm-convert`` name, equal to the family's ``ModelFamily.converter``.
    ``title``           the model's name in messages ("Qwen2.5-Omni").
    ``hf_model_types``  config.json ``model_type`` values this converter accepts.
    ``sub_config``      full transformers config -> the converted model's config; it must return a
                        sub-config given as it is (default: the config itself).
    ``names``           :class:`~mm_omni.checkpoint.mapping.HfNames`: the model's key prefix inside a
                        bigger checkpoint (kept on export), its two spellings, and the prefixes of other
                        models in the checkpoint (never converted; ``mm_to_hf`` copies them as they were).
    ``modules``         :class:`ModuleSpec` per module, in checkpoint order (see below).
    ``decoder``         the module whose first stage every other module must end on or before.
    ``table``           sub-config -> the :class:`~mm_omni.checkpoint.mapping.Map` table (canonical HF
                        names); compose the stack tables of ``mm_omni/models/{text,vision,audio}/hf_mapping.py``.
    ``hf_model``        ``"module:Class"`` of the transformers model built from the sub-config: its meta
                        ``state_dict()`` gives the HF names and shapes a checkpoint must hold, and the
                        precision check loads it with ``from_pretrained``.
    ``config_from_hf``  sub-config -> the model.json object (pydantic, ``model_dump``-able; the family's
                        adapter); the layout is written into the sections the modules name.
    ``check_config``    sub-config -> None; raises one ``ValueError`` naming every unsupported value
                        (runs before any tensor is read).
    ``derived``         canonical HF names of buffers derived from the config (rotary ``inv_freq``,
                        sinusoidal tables): skipped on the way in, copied from the original on the way out.
                        ``{layer}`` / ``{expert}`` match any number.
    ``tie``             :class:`Tie`, or None for a model that never ties its output layer.
    ``checkpoint_state``  (sub-config, ``hf_model``'s meta ``state_dict()`` in canonical names) -> the names
                        and shapes its checkpoint files hold, for a model whose loading fuses stored tensors
                        (one tensor per expert -> one ``gate_up_proj``); default: the same.
    ``precision``       :class:`Precision` (``--cfg.test_convert_precision``), or None (then the option
                        is refused).
    ``fused_parameter`` the stored (canonical) HF weights of one table entry -> ``(canonical name of the
                        transformers parameter holding them fused, expert index)``, or None for weights that
                        are a module's own (``gate_proj`` + ``up_proj`` of expert E -> ``gate_up_proj``, E):
                        where a PEFT adapter uses ``target_parameters``; default: never fused.

:class:`ModuleSpec` fields
    ``name``            key of the layout ("text", "vision", "audio") and of the table entries' ``module``.
    ``prefix``          every Megatron tensor of the module starts with it ("image_encoder.").
    ``layer_prefix``    "<...>.layers." followed by the layer number ("image_encoder.encoder.blocks.layers.").
    ``first`` / ``last``  prefixes of the tensors on the module's first / last stage with layers.
    ``pp_option``       the ``--cfg.parallel_config`` field of its layers per stage: ``llm_pp_layers``,
                        ``vit_pp_layers`` or ``audio_pp_layers`` (when left out: all on the first stage).
    ``tp_option``       its TP field: ``tp_size``, ``vit_tp_size`` or ``audio_tp_size`` (0 = tp_size).
    ``counts``          sub-config -> placeholder counts, ``{"layer": n}`` (+ ``"expert"``); ``layer`` is the
                        number of layers the pipeline splits.
    ``tp_divides``      sub-config -> ``{"what": size}``: every size its TP must divide ("num_heads": 16).
    ``attention``       sub-config -> :class:`~mm_omni.checkpoint.mapping.Attention` (the module's qkv ops).
    ``expert_prefix``   in a layer's tensor names, what comes before the expert number
                        ("mlp.experts.local_experts."): the module's experts are split over
                        ``--cfg.parallel_config.ep_size`` ranks (``counts`` then gives ``"expert"``).
    ``config_section``  dotted model.json section that gets ``tp`` / ``pp`` ("image_encoder").
    ``layers_section``  dotted section that gets ``pipeline_num_layers`` (default: ``config_section``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from torch import Tensor

from mm_omni.checkpoint.mapping import Attention, HfNames, Map, Rule, expand, name_regex


def _same(cfg):
    return cfg


def _accepts(cfg) -> None:
    return None


def _as_stored(cfg, state: dict) -> dict:
    return state


def _never_fused(hf_names: Sequence[str]) -> None:
    return None


@dataclass(frozen=True)
class ModuleSpec:
    name: str
    prefix: str
    layer_prefix: str
    first: tuple[str, ...] = ()
    last: tuple[str, ...] = ()
    pp_option: str = ""
    tp_option: str = ""
    counts: Optional[Callable[[Any], Mapping[str, int]]] = None
    tp_divides: Optional[Callable[[Any], Mapping[str, int]]] = None
    attention: Optional[Callable[[Any], Attention]] = None
    config_section: str = ""
    layers_section: str = ""
    expert_prefix: str = ""


@dataclass(frozen=True)
class Tie:
    """A tied output layer: the HF checkpoint may list ``hf_alias`` (the embedding under a second name);
    Megatron keeps only ``embedding``, plus a copy as ``output`` on the last stage when PP splits them."""

    flag: Callable[[Any], bool]  # sub-config -> whether the model ties (transformers' flag of that config)
    hf_alias: str                # canonical HF name, e.g. "lm_head.weight"
    embedding: str               # Megatron name, e.g. "text_decoder.embedding.word_embeddings.weight"
    output: str                  # Megatron name, e.g. "text_decoder.output_layer.weight"


@dataclass(frozen=True)
class Precision:
    """``--cfg.test_convert_precision``: our model on the converted weights vs transformers' on hf_dir, fp32."""

    # sub-config -> our model, into which the converted checkpoint (TP shards merged) is loaded
    model: Callable[[Any], Any]
    # (transformers model, our model, sub-config, torch.Generator) -> {what is compared: (ours, theirs)};
    # one probe with every modality the model reads, text ids drawn from outside the special tokens
    compare: Callable[[Any, Any, Any, Any], Mapping[str, tuple[Tensor, Tensor]]]


@dataclass(frozen=True)
class ConverterSpec:
    converter: str
    title: str
    hf_model_types: tuple[str, ...]
    names: HfNames
    modules: tuple[ModuleSpec, ...]
    decoder: str
    table: Callable[[Any], Sequence[Map]]
    hf_model: str
    config_from_hf: Callable[[Any], Any]
    sub_config: Callable[[Any], Any] = _same
    check_config: Callable[[Any], None] = _accepts
    derived: tuple[str, ...] = ()
    tie: Optional[Tie] = None
    precision: Optional[Precision] = None
    checkpoint_state: Callable[[Any, dict], dict] = _as_stored
    fused_parameter: Callable[[Sequence[str]], Optional[tuple[str, int]]] = _never_fused

    # -- derived views (no state) -------------------------------------------------------------------
    def rules(self, cfg) -> list[Rule]:
        """Every Megatron tensor of the model (TP1/PP1, global numbering), in checkpoint order."""
        counts = {m.name: dict(m.counts(cfg)) if m.counts else {} for m in self.modules}
        attention = {m.name: m.attention(cfg) for m in self.modules if m.attention}
        return expand(self.table(cfg), counts, attention)

    def is_tied(self, cfg) -> bool:
        return self.tie is not None and bool(self.tie.flag(cfg))

    def layers(self, cfg) -> dict[str, int]:
        """Layers per module (what ``*_pp_layers`` must sum to)."""
        return {m.name: int(m.counts(cfg)["layer"]) if m.counts else 0 for m in self.modules}

    def experts(self, cfg) -> dict[str, int]:
        """Experts per module that has them (what ``ep_size`` must divide)."""
        return {m.name: int(m.counts(cfg)["expert"]) for m in self.modules if m.expert_prefix}

    def module(self, name: str) -> ModuleSpec:
        return next(m for m in self.modules if m.name == name)

    def derived_regex(self):
        return name_regex(self.derived)

    def load_hf_model_class(self):
        module, _, attr = self.hf_model.partition(":")
        return getattr(importlib.import_module(module), attr)
