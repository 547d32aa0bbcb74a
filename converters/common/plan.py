"""One model to convert (a family's converter spec + its config): names, checks and layout plans.

Every check here runs before anything is written: the parallel layout against the model, the HF files
against what transformers builds from config.json, a Megatron checkpoint's layout against the options.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from converters.common.hf_io import HFSource
from converters.common.layout import Layout
from converters.config import ParallelConfig, nested
from mm_omni.checkpoint import mapping
from mm_omni.checkpoint.spec import ConverterSpec
from mm_omni.checkpoint.tp import SplitKind

log = logging.getLogger(__name__)

HF_CONFIG_COPY = "hf_config.json"  # the HF config.json, kept beside the mm checkpoint for resplit


@lru_cache(maxsize=4)
def _meta_state(spec: ConverterSpec, config_class: type, config_json: str) -> dict[str, Tensor]:
    model_class = spec.load_hf_model_class()
    cfg = config_class(**json.loads(config_json))
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = model_class(cfg)
    return dict(model.state_dict())


class Plan:
    """``spec`` applied to ``cfg`` (the sub-config: the transformers config of the converted model)."""

    def __init__(self, spec: ConverterSpec, cfg):
        self.spec, self.cfg = spec, cfg
        self.names = spec.names
        self.rules = spec.rules(cfg)
        self.by_mm = {r.mm: r for r in self.rules}
        self.by_hf = {h: r for r in self.rules for h in r.hf}
        self.tied = spec.is_tied(cfg)
        self.derived = spec.derived_regex()
        self._kinds = {r.mm: r.split for r in self.rules}
        if self.tied:
            self._kinds[spec.tie.output] = self._kinds[spec.tie.embedding]

    # -- names ------------------------------------------------------------------------------------------
    def split_kind(self, mm_name: str) -> SplitKind:
        """MindSpeed-MM's TP rule for one Megatron tensor, from the table."""
        try:
            return self._kinds[mm_name]
        except KeyError:
            raise KeyError(f"{mm_name}: not a tensor of the {self.spec.title} table") from None

    def accounted(self, canon: str) -> bool:
        """A canonical HF name no rule uses but that is expected: a derived buffer or the tied alias."""
        return bool(self.derived.match(canon)) or (self.tied and canon == self.spec.tie.hf_alias)

    def hf_to_mm(self, hf_state) -> dict[str, Tensor]:
        """HF tensors (either spelling, model prefix or not; other models' keys ignored) -> Megatron names."""
        canon = {self.names.canonical(k): v for k, v in hf_state.items() if self.names.is_model_key(k)}
        # a transformers model's in-memory state may spell tensors differently from its checkpoint files
        # (fused experts): the family's checkpoint_state gives the stored spelling the table maps
        canon = self.spec.checkpoint_state(self.cfg, canon)
        return mapping.hf_to_mm(canon, self.rules, self.accounted)

    def mm_to_hf(self, mm_state, style: mapping.Style = "module", prefix: str = "") -> dict[str, Tensor]:
        """Inverse of :meth:`hf_to_mm`; a tied model's output-layer copy is dropped (HF keeps the embedding)."""
        skip = (lambda k: k == self.spec.tie.output) if self.tied else (lambda k: False)
        return mapping.mm_to_hf(mm_state, self.rules, self.names, style, prefix, skip)

    def mm_names(self, layout: Layout) -> list[str]:
        """Tensors to write; a tied model with the embedding and output on different stages gets a copy
        of the embedding as the output layer on the last stage (Megatron's tied-embedding layout)."""
        names = [r.mm for r in self.rules]
        if self.tied:
            decoder = self.spec.decoder
            if layout.first_stage(decoder) != layout.last_stage(decoder):
                names.append(self.spec.tie.output)
        return names

    def source_name(self, name: str) -> str:
        """The global tensor ``name`` is made from: the embedding for a tied model's output-layer copy."""
        return self.spec.tie.embedding if self.tied and name == self.spec.tie.output else name

    def optional_mm_names(self) -> set[str]:
        """Tensors a checkpoint may hold beyond the table's (the tied output-layer copy)."""
        return {self.spec.tie.output} if self.tied else set()

    # -- shapes -----------------------------------------------------------------------------------------
    def hf_meta_state(self) -> dict[str, Tensor]:
        """Canonical HF names -> meta tensors of the shapes transformers builds from the config."""
        state = _meta_state(self.spec, type(self.cfg), self.cfg.to_json_string(use_diff=False))
        return self.spec.checkpoint_state(self.cfg, {self.names.canonical(k): v for k, v in state.items()})

    def mm_meta_state(self) -> dict[str, Tensor]:
        """Every full (TP1) Megatron tensor as a meta tensor: the shapes a checkpoint must merge back to."""
        return mapping.hf_to_mm(self.hf_meta_state(), self.rules, self.accounted)

    # -- checks -----------------------------------------------------------------------------------------
    def layers(self) -> dict[str, int]:
        return self.spec.layers(self.cfg)

    def tp_errors(self, tp: dict[str, int]) -> list[str]:
        """Every TP size that does not divide what it must split, as 'option=value: reason' lines."""
        errors = []
        for module in self.spec.modules:
            for what, n in (module.tp_divides(self.cfg) if module.tp_divides else {}).items():
                if n % tp[module.name]:
                    errors.append(f"{module.tp_option}={tp[module.name]} does not divide {module.name} {what}={n}")
        top = max(tp.values())
        for module in self.spec.modules:
            if top % tp[module.name]:
                errors.append(f"{module.tp_option}={tp[module.name]} does not divide the largest TP size {top} "
                              "(smaller module TP sizes are replicated cyclically over the largest)")
        return errors

    def ep_errors(self, ep: int) -> list[str]:
        """Why expert parallelism of size ``ep`` cannot split this model's experts, as 'option=value' lines."""
        experts = self.spec.experts(self.cfg)
        if ep == 1:
            return []
        if not experts:
            return [f"ep_size={ep}: {self.spec.title} has no experts; use 1"]
        return [f"ep_size={ep} does not divide {module} num_experts={n}: use a divisor of {n}"
                for module, n in experts.items() if n % ep]

    def make_layout(self, pc: ParallelConfig) -> Layout:
        """The layout ``pc`` asks for, after checking it against the model; all problems in one error."""
        modules, layers = self.spec.modules, self.layers()
        counts = pc.counts(modules, layers)
        errors = [f"{option}: {self.spec.title} has no such module; leave it out"
                  for option in pc.unused_options(modules)]
        decoder = self.spec.module(self.spec.decoder)
        shape = [len(c) for c in counts[decoder.name]]
        for module in modules:
            chunks = counts[module.name]
            if [len(c) for c in chunks] != shape:
                errors.append(f"{module.pp_option}={chunks} has chunk/stage lengths {[len(c) for c in chunks]} but "
                              f"{decoder.pp_option} has {shape}: give every module one count per stage (zeros where "
                              "it has none)")
            total = sum(map(sum, chunks))
            if total != layers[module.name]:
                errors.append(f"{module.pp_option}={chunks} sums to {total} but the {module.name} model has "
                              f"{layers[module.name]} layers")
        tp = pc.tp(modules)
        ep = pc.ep_size or 1
        errors += self.ep_errors(ep)
        if not errors:
            layout = Layout(counts, tp, modules, ep, self.spec.experts(self.cfg))
            first = next((i for i, n in enumerate(layout.flat(decoder.name)) if n), 0)
            for module in modules:
                if module.name != decoder.name and layers[module.name] and layout.last_stage(module.name) > first:
                    errors.append(f"{module.pp_option}={counts[module.name]} has layers on stage "
                                  f"{layout.last_stage(module.name)} but the {decoder.name} decoder starts on stage "
                                  f"{first} ({decoder.pp_option}={counts[decoder.name]}): encoders must finish "
                                  "before the decoder starts, e.g. [[32,0,0,0]] with [[1,10,10,7]]")
        errors += self.tp_errors(tp)
        if errors:
            raise ValueError("invalid parallel_config:\n  " + "\n  ".join(errors))
        return layout

    def check_same_layout(self, found: Layout, given: ParallelConfig | None, where: Path, option: str) -> None:
        if given is None:
            return
        modules = self.spec.modules
        want, tp = given.counts(modules, self.layers()), given.tp(modules)
        problems = [f"{self.spec.module(m).pp_option}: checkpoint {found.counts[m]}, {option} {nested(want[m])}"
                    for m in found.counts if found.counts[m] != want[m]]
        problems += [f"{self.spec.module(m).tp_option}: checkpoint {found.tp[m]}, {option} {tp[m]}"
                     for m in found.tp if found.tp[m] != tp[m]]
        if found.ep != (given.ep_size or 1):
            problems.append(f"ep_size: checkpoint {found.ep}, {option} {given.ep_size or 1}")
        if problems:
            raise ValueError(f"{where} has a different layout than --cfg.{option} says (omit it to use the "
                             "checkpoint's):\n  " + "\n  ".join(problems))

    def check_hf(self, src: HFSource) -> tuple[str, mapping.Style]:
        """The HF files hold exactly the model transformers builds from config.json; returns (prefix, style)."""
        prefix, style = self.names.detect_style(src.keys())
        expected = self.hf_meta_state()
        found = {self.names.canonical(k): k for k in src.keys() if self.names.is_model_key(k)}
        problems = []
        for canon, key in found.items():
            if canon not in expected:
                if not self.derived.match(canon):
                    problems.append(f"unexpected tensor {key}")
            elif list(expected[canon].shape) != list(src.shape(key)):
                problems.append(f"{key}: shape {src.shape(key)} but config.json implies {list(expected[canon].shape)}")
        tied_alias = {self.spec.tie.hf_alias} if self.tied else set()
        problems += [f"missing tensor {prefix}{c}" for c in expected if c not in found and c not in tied_alias]
        if problems:
            raise ValueError(f"{src.dir} is not a {self.spec.title} checkpoint matching its config.json:\n  "
                             + "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else ""))
        return prefix, style

    # -- side files ---------------------------------------------------------------------------------------
    def model_json(self, layout: Layout) -> dict:
        """MindSpeed-MM's model.json for this architecture, with the layout written into each module's sections."""
        cfg = self.spec.config_from_hf(self.cfg)
        for module in self.spec.modules:
            section = _section(cfg, module.config_section)
            if section is None:
                continue
            counts = layout.counts[module.name]
            _section(cfg, module.layers_section or module.config_section).pipeline_num_layers = \
                counts[0] if layout.vpp == 1 else counts
            section.tp, section.pp = layout.tp[module.name], layout.pp
        return cfg.model_dump(mode="json", exclude_none=True)

    def write_side_files(self, dst: Path, layout: Layout, hf_config_json: str) -> None:
        (dst / "model.json").write_text(json.dumps(self.model_json(layout), indent=2) + "\n")
        (dst / HF_CONFIG_COPY).write_text(hf_config_json)


def _section(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part, None)
        if cfg is None:
            return None
    return cfg


def load_config_text(config_json: str):
    """A config.json's text -> the full transformers config."""
    from transformers import AutoConfig

    return AutoConfig.for_model(**json.loads(config_json))
