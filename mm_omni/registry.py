"""The one seam between the framework and its model families.

A family is a folder ``mm_omni/models/<family>/`` whose ``family.py`` defines ``FAMILY``, a
:class:`ModelFamily`. Nothing else registers it: :func:`families` imports every such module, so adding a
model is adding a folder (docs/adding_a_model.md). Generic code (training loop, data pipeline, converter
command line) asks the registry for the family of a model.json, an HF ``config.json`` or a data.json
``template`` and calls what the family declares; it never names a family itself.

The family's pieces are named as ``"module:attribute"`` strings and imported on first use, so that
listing the families (``python -m mm_omni.registry``) or validating a model.json imports no model code.

    python -m mm_omni.registry            # every family, its keys and what is supported / tested
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Union


@dataclass(frozen=True)
class ModelFamily:
    """What a model family declares. ``*_ref`` fields are ``"module:attribute"`` import paths."""

    name: str                                  # the folder name, e.g. "qwen2_5_omni"
    title: str                                 # e.g. "Qwen2.5-Omni (thinker)"
    # model.json keys that select the family: (top-level ``model_id``, ``text_decoder.model_id``) pairs.
    # MindSpeed-MM gives Qwen2.5-VL and Qwen2.5-Omni the same top-level "qwen2_5vl": the decoder's id tells them apart.
    model_ids: tuple[tuple[str, str], ...]
    hf_model_types: tuple[str, ...]            # config.json ``model_type`` values the converter accepts
    templates: tuple[str, ...]                 # data.json ``basic_parameters.template`` names
    converter: str                             # ``mm-convert <converter> ...``
    modalities: tuple[str, ...]                # media the model reads: "image", "video", "audio"
    model_config_ref: str                      # pydantic class of model.json (classmethod ``model_validate``)
    config_from_hf_ref: str                    # transformers config (as loaded from config.json) -> model.json object
    task_ref: str                              # (args, model config) -> mm_omni.training.task.TrainTask
    template_ref: str                          # a mm_omni.data.template.ChatTemplate instance
    converter_ref: str                         # the class ``mm-convert`` exposes (hf_to_mm / mm_to_hf / resplit)
    flops_ref: str                             # (model config, micro-batch) -> fwd+bwd FLOPs
    # the model class the task builds (model config, pre_process=, post_process=, ...): OmniModel or a subclass
    # with the family's encoder stacks
    model_ref: str = "mm_omni.models.omni:OmniModel"
    # what the family supports and how each is tested, for ``python -m mm_omni.registry`` and the README table
    features: dict[str, str] = field(default_factory=dict)

    def load(self, ref_field: str) -> Any:
        """Import what ``<ref_field>_ref`` names."""
        module, _, attr = getattr(self, f"{ref_field}_ref").partition(":")
        return getattr(importlib.import_module(module), attr)

    def load_model_config(self, data: dict, source: str = "model.json"):
        from pydantic import ValidationError

        try:
            return self.load("model_config").model_validate(data)
        except ValidationError as err:
            raise ValueError(f"{source}: invalid {self.title} model config:\n{err}") from None


@lru_cache(maxsize=1)
def families() -> tuple[ModelFamily, ...]:
    """Every family: ``FAMILY`` of each ``mm_omni/models/<folder>/family.py``, in folder-name order."""
    import mm_omni.models as models_pkg

    found = []
    for info in sorted(pkgutil.iter_modules(models_pkg.__path__), key=lambda i: i.name):
        if info.ispkg and (Path(models_pkg.__path__[0]) / info.name / "family.py").is_file():
            family = importlib.import_module(f"mm_omni.models.{info.name}.family").FAMILY
            if family.name != info.name:
                raise RuntimeError(f"mm_omni/models/{info.name}/family.py: FAMILY.name={family.name!r} must be the "
                                   f"folder name {info.name!r}")
            found.append(family)
    _check_unique(found)
    return tuple(found)


def _check_unique(found: list[ModelFamily]) -> None:
    for key in ("model_ids", "hf_model_types", "templates"):
        owner: dict[Any, str] = {}
        for fam in found:
            for value in getattr(fam, key):
                if value in owner:
                    raise RuntimeError(f"{key} {value!r} is claimed by both {owner[value]} and {fam.name}")
                owner[value] = fam.name
    names = [f.converter for f in found]
    if len(set(names)) != len(names):
        raise RuntimeError(f"two families declare the same converter name: {names}")


def by_name(name: str) -> ModelFamily:
    for fam in families():
        if fam.name == name:
            return fam
    raise KeyError(f"no model family {name!r}; registered: {[f.name for f in families()]}")


def for_model_json(data: dict, source: str = "model.json") -> ModelFamily:
    """The family of a parsed model.json, by its top-level and ``text_decoder`` ``model_id``."""
    top = data.get("model_id")
    text = data.get("text_decoder") or {}
    decoder = text.get("model_id") if isinstance(text, dict) else None
    known = {pair: fam for fam in families() for pair in fam.model_ids}
    if decoder is None:  # a decoder id left out: the top-level id alone, when one family owns it
        matches = {fam.name: fam for (t, _), fam in known.items() if t == top}
        if len(matches) == 1:
            return next(iter(matches.values()))
    elif (top, decoder) in known:
        return known[(top, decoder)]
    pairs = ", ".join(f"{t}/{d} ({fam.name})" for (t, d), fam in known.items())
    raise ValueError(f"{source}: model_id={top!r} with text_decoder.model_id={decoder!r} is no registered model "
                     f"family; known model_id/text_decoder.model_id pairs: {pairs}")


def for_hf_model_type(model_type: Optional[str], source: str = "config.json") -> ModelFamily:
    for fam in families():
        if model_type in fam.hf_model_types:
            return fam
    known = {t: f.name for f in families() for t in f.hf_model_types}
    raise ValueError(f"{source}: model_type={model_type!r} is no registered model family (known: {known})")


def for_template(template: str, source: str = "data.json") -> ModelFamily:
    for fam in families():
        if template in fam.templates:
            return fam
    known = [t for f in families() for t in f.templates]
    raise ValueError(f"{source}: basic_parameters.template={template!r} is not supported; use one of {known}")


def template_names() -> list[str]:
    return [t for f in families() for t in f.templates]


def load_model_config(path: Union[str, Path]):
    """Read a model.json, pick its family and validate it with the family's schema: (family, config)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--mm-model {path}: no such file; pass the path of a model.json")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    family = for_model_json(data, str(path))
    return family, family.load_model_config(data, str(path))


def describe() -> str:
    """The table ``python -m mm_omni.registry`` prints."""
    lines = []
    for fam in families():
        lines.append(f"{fam.name}: {fam.title}")
        lines.append("  model.json model_id / text_decoder.model_id: "
                     + ", ".join(f"{t} / {d}" for t, d in fam.model_ids))
        lines.append(f"  HF config.json model_type: {', '.join(fam.hf_model_types)}")
        lines.append(f"  data.json template: {', '.join(fam.templates)}")
        lines.append(f"  converter: mm-convert {fam.converter} hf_to_mm | mm_to_hf | resplit")
        lines.append(f"  modalities: {', '.join(fam.modalities)}")
        for feature, status in fam.features.items():
            lines.append(f"  {feature}: {status}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    print(describe(), end="")


if __name__ == "__main__":
    main()
