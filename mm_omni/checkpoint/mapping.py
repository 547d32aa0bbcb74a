"""A model's Hugging Face <-> Megatron (MindSpeed-MM) tensor names, as a declarative table.

A table is a sequence of :class:`Map` entries, one per Megatron tensor pattern::

    Map("text_decoder.decoder.layers.{layer}.self_attention.linear_qkv.weight",
        ("model.layers.{layer}.self_attn.q_proj.weight", "model.layers.{layer}.self_attn.k_proj.weight",
         "model.layers.{layer}.self_attn.v_proj.weight"), op="qkv", split="row", module="text")

* ``mm``: the Megatron name at TP1/PP1 with global layer numbers (what a one-rank checkpoint holds);
* ``hf``: the Hugging Face name(s) it is made of, in the canonical ("hub") spelling and without a model
  prefix (:class:`HfNames` maps the other spellings and prefixes onto it);
* ``{layer}`` / ``{expert}``: placeholders, expanded by :func:`expand` from the counts of the entry's
  ``module`` (``{"text": {"layer": 28}}``); every name of an entry uses the same placeholders;
* ``op``: how the HF tensors become the Megatron one; each has an exact inverse, so a round trip is
  bit-identical:

  - ``copy``: one tensor as it is;
  - ``qkv``: separate q, k, v -> rows interleaved per KV group ``[q_g0, k_g0, v_g0, q_g1, ...]``
    (Megatron's ``linear_qkv``: a TP rank taking a contiguous row block gets whole groups);
  - ``qkv_fused``: one HF tensor ``[q; k; v]`` (e.g. Qwen2.5-VL's vision ``attn.qkv``), split into its
    three blocks, then interleaved like ``qkv``;
  - ``qv_zero_k``: q and v biases only (Whisper's ``k_proj`` has none) -> a ``qkv`` bias with a zero key
    slice. The inverse drops the key slice even when training made it nonzero, which is exact:
    ``q.(k + b) = q.k + q.b`` adds one constant to every score of a query and softmax is shift-invariant
    (a nonzero slice is logged);
  - ``gate_up``: gate and up projections -> ``cat([gate, up])`` (a gated MLP's ``linear_fc1``);

  ``qkv`` ops take the module's :class:`Attention` geometry (heads, KV groups, head size);
* ``split``: the tensor-parallel split of the Megatron tensor (:mod:`mm_omni.checkpoint.tp`): ``row``,
  ``col``, ``glu`` or ``rep``.

:func:`expand` turns a table into :class:`Rule` s (concrete names); :func:`hf_to_mm` / :func:`mm_to_hf`
apply them to state dicts. Partial state dicts (one module, gradients) convert: every rule whose tensors
are present fires; a fused rule with only some of its parts present raises.
"""

from __future__ import annotations

import itertools
import logging
import re
import string
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Mapping, Sequence

import torch
from torch import Tensor

from mm_omni.checkpoint.fuse import cat_gate_up, interleave_groups, split_gate_up, split_groups
from mm_omni.checkpoint.tp import SplitKind

log = logging.getLogger(__name__)

Op = Literal["copy", "qkv", "qkv_fused", "qv_zero_k", "gate_up"]
Style = Literal["module", "hub"]
PARTS = {"copy": 1, "qkv": 3, "qkv_fused": 1, "qv_zero_k": 2, "gate_up": 2}  # HF tensors per op
ATTENTION_OPS = ("qkv", "qkv_fused", "qv_zero_k")
PLACEHOLDERS = ("layer", "expert")
SPLITS = ("row", "col", "glu", "rep")


def _placeholders(pattern: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None))
    unknown = [n for n in names if n not in PLACEHOLDERS]
    if unknown:
        raise ValueError(f"{pattern}: unknown placeholder(s) {unknown}; use {list(PLACEHOLDERS)}")
    return names


@dataclass(frozen=True)
class Map:
    """One table entry: a Megatron tensor (pattern) and the HF tensor(s) it is made of."""

    mm: str
    hf: str | tuple[str, ...]
    op: Op = "copy"
    split: SplitKind = "rep"
    module: str = ""  # whose counts fill the placeholders and whose Attention the qkv ops use

    def __post_init__(self):
        if isinstance(self.hf, str):
            object.__setattr__(self, "hf", (self.hf,))
        if self.op not in PARTS:
            raise ValueError(f"{self.mm}: op={self.op!r}; use one of {list(PARTS)}")
        if len(self.hf) != PARTS[self.op]:
            raise ValueError(f"{self.mm}: op {self.op!r} takes {PARTS[self.op]} HF tensor(s), got {list(self.hf)}")
        if self.split not in SPLITS:
            raise ValueError(f"{self.mm}: split={self.split!r}; use one of {list(SPLITS)}")
        mine = set(_placeholders(self.mm))
        for name in self.hf:
            if set(_placeholders(name)) != mine:
                raise ValueError(f"{self.mm}: HF name {name} must use the same placeholders {sorted(mine)}")

    @property
    def placeholders(self) -> tuple[str, ...]:
        return _placeholders(self.mm)


@dataclass(frozen=True)
class Attention:
    """The attention geometry a ``qkv`` op needs: ``groups`` = KV heads (= ``heads`` without GQA)."""

    heads: int
    groups: int
    head_dim: int

    def rows(self) -> tuple[int, int, int]:
        """Rows of q, k, v in one group."""
        if self.heads % self.groups:
            raise ValueError(f"{self.heads} attention heads do not split into {self.groups} KV groups")
        return self.heads // self.groups * self.head_dim, self.head_dim, self.head_dim


@dataclass(frozen=True)
class Rule:
    """One concrete Megatron tensor and the canonical HF tensors it is made of."""

    mm: str
    hf: tuple[str, ...]
    op: Op = "copy"
    split: SplitKind = "rep"
    groups: int = 0
    rows: tuple[int, ...] = ()  # rows per group of q, k, v (qkv ops)


def _expand_one(entry: Map, values: dict[str, int], attention: Attention | None) -> Rule:
    groups, rows = (attention.groups, attention.rows()) if attention is not None else (0, ())
    return Rule(entry.mm.format(**values), tuple(h.format(**values) for h in entry.hf), entry.op, entry.split,
                groups, rows)


def expand(table: Iterable[Map], counts: Mapping[str, Mapping[str, int]],
           attention: Mapping[str, Attention] | None = None) -> list[Rule]:
    """Every concrete rule of ``table``; ``counts[module][placeholder]`` ranges each placeholder.

    Order (the order tensors are written in): per run of entries of one module, the entries without
    placeholders, then layer by layer every ``{layer}`` entry (experts innermost), then any other.
    """
    attention = attention or {}
    out: list[Rule] = []
    for module, run in itertools.groupby(table, key=lambda e: e.module):
        run = list(run)
        geometry = None
        if any(e.op in ATTENTION_OPS for e in run):
            if module not in attention:
                raise KeyError(f"module {module!r} has qkv entries but no Attention geometry was given")
            geometry = attention[module]

        def ranges(entry: Map, skip=()):
            names = [p for p in entry.placeholders if p not in skip]
            missing = [p for p in names if p not in counts.get(module, {})]
            if missing:
                raise KeyError(f"{entry.mm}: no count of {missing} for module {module!r} (counts: {dict(counts)})")
            return names, [range(counts[module][p]) for p in names]

        def emit(entry: Map, fixed: dict[str, int]):
            names, spans = ranges(entry, skip=fixed)
            for combo in itertools.product(*spans):
                out.append(_expand_one(entry, {**fixed, **dict(zip(names, combo))},
                                       geometry if entry.op in ATTENTION_OPS else None))

        for entry in run:
            if not entry.placeholders:
                emit(entry, {})
        layered = [e for e in run if "layer" in e.placeholders]
        if layered:
            ranges(layered[0])  # raises naming the entry when the module has no layer count
            for n in range(counts[module]["layer"]):
                for entry in layered:
                    emit(entry, {"layer": n})
        for entry in run:
            if entry.placeholders and "layer" not in entry.placeholders:
                emit(entry, {})
    names = [r.mm for r in out]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"the table names these Megatron tensors twice: {dup[:5]}")
    return out


def name_regex(patterns: Iterable[str]) -> re.Pattern:
    """One regex matching any of ``patterns`` (placeholders match any number)."""
    alts = [re.sub(r"\\\{(%s)\\\}" % "|".join(PLACEHOLDERS), r"\\d+", re.escape(p)) for p in patterns]
    return re.compile("^(" + "|".join(alts) + ")$") if alts else re.compile(r"(?!)")


# -- ops ----------------------------------------------------------------------------------------------
def fuse(rule: Rule, parts: Sequence[Tensor]) -> Tensor:
    """The HF tensors of ``rule`` (in ``rule.hf`` order) -> its Megatron tensor."""
    if rule.op == "copy":
        return parts[0]
    if rule.op == "gate_up":
        return cat_gate_up(*parts)
    if rule.op == "qkv":
        return interleave_groups(parts, rule.groups)
    if rule.op == "qkv_fused":
        fused = parts[0]
        blocks = [rule.groups * r for r in rule.rows]
        if fused.shape[0] != sum(blocks):
            raise ValueError(f"{rule.hf[0]}: {fused.shape[0]} rows, expected q/k/v blocks of {blocks}")
        return interleave_groups(list(fused.split(blocks, 0)), rule.groups)
    q, v = parts  # qv_zero_k
    return interleave_groups([q, torch.zeros_like(q), v], rule.groups)


def unfuse(rule: Rule, value: Tensor) -> list[Tensor]:
    """Inverse of :func:`fuse`: the Megatron tensor -> the HF tensors of ``rule`` (contiguous)."""
    if rule.op == "copy":
        return [value]
    if rule.op == "gate_up":
        return list(split_gate_up(value))
    q, k, v = split_groups(value, rule.groups, rule.rows)
    if rule.op == "qkv":
        return [q, k, v]
    if rule.op == "qkv_fused":
        return [torch.cat([q, k, v], 0)]
    if torch.count_nonzero(k):
        log.info("%s: dropping a nonzero key bias (max |b| = %.3g); exact, softmax is shift-invariant",
                 rule.mm, k.abs().max().item())
    return [q, v]


# -- state dicts --------------------------------------------------------------------------------------
def hf_to_mm(state: Mapping[str, Tensor], rules: Iterable[Rule],
             accounted: Callable[[str], bool] = lambda name: False) -> dict[str, Tensor]:
    """Canonical HF names -> Megatron names. A tensor no rule uses raises unless ``accounted(name)``
    (config-derived buffers, a tied alias)."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    for rule in rules:
        present = [h for h in rule.hf if h in state]
        if not present:
            continue
        if len(present) != len(rule.hf):
            missing = sorted(set(rule.hf) - set(present))
            raise KeyError(f"{rule.mm} needs {list(rule.hf)} but {missing} are missing from the HF state dict")
        used.update(rule.hf)
        out[rule.mm] = fuse(rule, [state[h] for h in rule.hf])
    unused = [k for k in state if k not in used and not accounted(k)]
    if unused:
        raise KeyError(f"HF tensors with no MindSpeed-MM name (config mismatch?): {sorted(unused)[:20]}"
                       f"{' ...' if len(unused) > 20 else ''}")
    return out


@dataclass(frozen=True)
class HfNames:
    """How a family's HF checkpoints spell tensor names, around the canonical names of its table.

    * ``prefix``: a prefix the model's keys carry inside a bigger checkpoint (Qwen2.5-Omni's ``thinker.``)
      and not in the bare model's ``state_dict()``; keys are accepted with or without it;
    * ``spellings``: ``(module prefix, hub prefix)`` pairs. "hub" is what ``save_pretrained`` writes and the
      Hub holds (the canonical spelling of the table, e.g. ``model.layers.0``); "module" is the
      ``state_dict()`` of transformers >= 5 (``model.language_model.layers.0``);
    * ``other_models``: prefixes of other models in the same checkpoint (``talker.``): never converted,
      carried over from the original files as they are.
    """

    prefix: str = ""
    spellings: tuple[tuple[str, str], ...] = ()
    other_models: tuple[str, ...] = ()

    def split_prefix(self, key: str) -> tuple[str, str]:
        """``thinker.model.x`` -> (``thinker.``, ``model.x``)."""
        if self.prefix and key.startswith(self.prefix):
            return self.prefix, key[len(self.prefix):]
        return "", key

    def is_model_key(self, key: str) -> bool:
        return not self.split_prefix(key)[1].startswith(self.other_models)

    def to_canonical(self, local: str) -> str:
        """A prefix-free key in either spelling -> the hub spelling."""
        for module, hub in sorted(self.spellings, key=lambda p: -len(p[0])):
            if local.startswith(module):
                return hub + local[len(module):]
        return local

    def canonical(self, key: str) -> str:
        return self.to_canonical(self.split_prefix(key)[1])

    def from_canonical(self, hub_name: str, style: Style = "module", prefix: str = "") -> str:
        if style == "module":
            for module, hub in sorted(self.spellings, key=lambda p: -len(p[1])):
                if hub_name.startswith(hub):
                    return prefix + module + hub_name[len(hub):]
        return prefix + hub_name

    def detect_style(self, keys: Iterable[str]) -> tuple[str, Style]:
        """(prefix, style) of a checkpoint's model keys; module style wins on any module-spelled key."""
        prefix, style = "", "hub"
        modules = tuple(m for m, _ in self.spellings)
        for key in keys:
            pre, local = self.split_prefix(key)
            if local.startswith(self.other_models):
                continue
            prefix = pre
            if modules and local.startswith(modules):
                return prefix, "module"
        return prefix, style


CANONICAL = HfNames()


def mm_to_hf(state: Mapping[str, Tensor], rules: Iterable[Rule], names: HfNames = CANONICAL, style: Style = "hub",
             prefix: str = "", skip: Callable[[str], bool] = lambda name: False) -> dict[str, Tensor]:
    """Inverse of :func:`hf_to_mm`, spelled by ``names`` in ``style`` with ``prefix``. Megatron's
    ``._extra_state`` entries and names ``skip`` accepts (a tied output layer's copy) are left out."""
    table = {r.mm: r for r in rules}
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        rule = table.get(key)
        if rule is None:
            if not (key.endswith("._extra_state") or skip(key)):
                unknown.append(key)
            continue
        for name, tensor in zip(rule.hf, unfuse(rule, value)):
            out[names.from_canonical(name, style, prefix)] = tensor
    if unknown:
        raise KeyError(f"MindSpeed-MM tensors with no HF name (config mismatch?): {sorted(unknown)[:20]}")
    return out
