"""Pipeline layout of a multi-module model: which stage holds which layer, and local numbering.

Counts are per module as ``[vpp_chunk][pp_stage]`` (MindSpeed-MM's ``*_pp_layers``). Stages are
ordered chunk-major (all stages of chunk 0, then chunk 1, ...), which is Megatron's virtual
pipeline order. Layers are renumbered from 0 on every stage; a module's "first" weights (embedding,
patch embed, convs) live on its first stage with layers, its "last" weights (final norm, output
layer, projector) on its last.
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


_NUM = re.compile(r"(\d+)\.")


def _layer_number(spec: ModuleSpec, name: str) -> int | None:
    if not name.startswith(spec.layer_prefix):
        return None
    m = _NUM.match(name, len(spec.layer_prefix))
    if m is None:
        raise KeyError(f"{name}: no layer number after {spec.layer_prefix}")
    return int(m.group(1))
