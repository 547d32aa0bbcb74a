"""Pipeline layout of a multi-module model: which stage holds which layer, and local numbering.

Counts are per module as ``[vpp_chunk][pp_stage]`` (MindSpeed-MM's ``*_pp_layers``). Stages are
ordered chunk-major (all stages of chunk 0, then chunk 1, ...), which is Megatron's virtual
pipeline order. Layers are renumbered from 0 on every stage; a module's "first" weights (embedding,
patch embed, convs) live on its first stage with layers, its "last" weights (final norm, output
layer, projector) on its last.

Expert parallelism (``ep`` > 1) splits the experts of the modules with an ``expert_prefix`` into ``ep``
contiguous blocks: EP rank r holds experts ``r*E/ep .. (r+1)*E/ep - 1`` renumbered from 0 (megatron's
``local_experts``), and a copy of every other tensor of its stage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mm_omni.checkpoint.spec import ModuleSpec  # name, prefix, layer_prefix, first / last-stage prefixes


@dataclass
class Layout:
    counts: dict[str, list[list[int]]]
    tp: dict[str, int]
    specs: tuple[ModuleSpec, ...] = field(default_factory=tuple)
    ep: int = 1
    experts: dict[str, int] = field(default_factory=dict)  # module -> global expert count (modules with experts)

    @property
    def vpp(self) -> int:
        return len(next(iter(self.counts.values())))

    @property
    def pp(self) -> int:
        return len(next(iter(self.counts.values()))[0])

    @property
    def tp_files(self) -> int:
        """Files per stage: the largest module TP (smaller ones are replicated cyclically)."""
        return max(self.tp.values())

    def stages(self) -> list[tuple[int, int]]:
        return [(v, p) for v in range(self.vpp) for p in range(self.pp)]

    def flat(self, module: str) -> list[int]:
        return [n for chunk in self.counts[module] for n in chunk]

    def offsets(self, module: str) -> list[int]:
        out, acc = [], 0
        for n in self.flat(module):
            out.append(acc)
            acc += n
        return out

    def first_stage(self, module: str) -> int:
        return next((i for i, n in enumerate(self.flat(module)) if n), 0)

    def last_stage(self, module: str) -> int:
        flat = self.flat(module)
        return max((i for i, n in enumerate(flat) if n), default=0)

    def spec_of(self, name: str) -> ModuleSpec:
        for spec in self.specs:
            if name.startswith(spec.prefix):
                return spec
        raise KeyError(f"{name}: belongs to no module of the layout ({[s.prefix for s in self.specs]})")

    def place(self, name: str) -> tuple[int, str]:
        """Global name -> (flat stage index, stage-local name)."""
        spec = self.spec_of(name)
        layer = _layer_number(spec, name)
        if layer is not None:
            offsets, flat = self.offsets(spec.name), self.flat(spec.name)
            for i, (start, n) in enumerate(zip(offsets, flat)):
                if start <= layer < start + n:
                    return i, f"{spec.layer_prefix}{layer - start}{name[len(spec.layer_prefix) + len(str(layer)):]}"
            raise KeyError(f"{name}: layer {layer} is beyond the {sum(flat)} layers of {spec.name}")
        if name.startswith(spec.first):
            return self.first_stage(spec.name), name
        if name.startswith(spec.last):
            return self.last_stage(spec.name), name
        raise KeyError(f"{name}: neither a layer nor a first/last-stage tensor of {spec.name}")

    def globalize(self, stage: int, local: str) -> str:
        """Stage-local name -> global name (inverse of :meth:`place`)."""
        spec = self.spec_of(local)
        layer = _layer_number(spec, local)
        if layer is None:
            return local
        start = self.offsets(spec.name)[stage]
        return f"{spec.layer_prefix}{layer + start}{local[len(spec.layer_prefix) + len(str(layer)):]}"


    def ep_place(self, local: str) -> tuple[int | None, str]:
        """A (stage-local) name -> (EP rank, EP-local name) for an expert's tensor; (None, name) for any other,
        and for every tensor without expert parallelism (each rank file then holds all experts)."""
        spec = self.spec_of(local)
        found = _expert_number(spec, local) if self.ep > 1 else None
        if found is None:
            return None, local
        start, end, expert = found
        rank, index = divmod(expert, self.experts[spec.name] // self.ep)
        return rank, f"{local[:start]}{index}{local[end:]}"


_NUM = re.compile(r"(\d+)\.")


def _expert_number(spec: ModuleSpec, name: str) -> tuple[int, int, int] | None:
    """(start, end, number) of the expert number in ``name``; None for a tensor of no expert."""
    if not spec.expert_prefix:
        return None
    m = re.match(re.escape(spec.layer_prefix) + r"\d+\." + re.escape(spec.expert_prefix) + r"(\d+)\.", name)
    return None if m is None else (m.start(1), m.end(1), int(m.group(1)))


def is_expert(spec: ModuleSpec, name: str) -> bool:
    """Whether ``name`` (a layer-numbered tensor name of ``spec``'s module) is one expert's."""
    return _expert_number(spec, name) is not None


def ep_globalize(spec: ModuleSpec, ep_rank: int, per_rank: int, local: str) -> str:
    """Inverse of :meth:`Layout.ep_place`: EP rank ``ep_rank`` holds ``per_rank`` experts per layer."""
    found = _expert_number(spec, local)
    if found is None:
        return local
    start, end, index = found
    return f"{local[:start]}{ep_rank * per_rank + index}{local[end:]}"


def local_experts(spec: ModuleSpec, names) -> int:
    """Experts per layer of ``spec``'s module that ``names`` (one rank file's) hold (0: none)."""
    per_layer: dict[str, set[int]] = {}
    for name in names:
        found = _expert_number(spec, name)
        if found is not None:
            per_layer.setdefault(name[:found[0]], set()).add(found[2])
    return max((len(s) for s in per_layer.values()), default=0)


def _layer_number(spec: ModuleSpec, name: str) -> int | None:
    if not name.startswith(spec.layer_prefix):
        return None
    m = _NUM.match(name, len(spec.layer_prefix))
    if m is None:
        raise KeyError(f"{name}: no layer number after {spec.layer_prefix}")
    return int(m.group(1))
