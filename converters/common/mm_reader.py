"""Read a Megatron checkpoint of any layout back into global (TP1, PP1) tensors, lazily.

The layout is discovered from the files: PP/VPP from the rank grid and chunk keys, layer counts per
stage from the layer numbers found, each tensor's TP from its shard shape against the full shape
(so hetero per-module TP needs no side information). Rank files are memory-mapped; the mappings
are dropped when the stage changes and after every ``RELEASE_BYTES`` read, so the resident mapped
pages stay bounded (a stage's files held open measured 4.2 GB peak RSS for mm_to_hf of a half-depth 7B).
With expert parallelism (``mp_rank_TT_PPP_EEE``) each EP rank's experts are renumbered back to global
numbers (EP rank r's local expert i is expert ``r * n + i`` for its n local experts per layer); the other
tensors are read from EP rank 0 (every EP rank holds the same ones).

LoRA: a checkpoint trained with adapters holds ``<linear>.lora_A.weight`` / ``lora_B.weight`` beside
``<linear>.weight``; a LoRA run's own saves hold only the adapters (and whatever else trained), read
with ``lora_path`` over the base checkpoint that run loaded (same pipeline layout, any TP). The
adapter tensors are never listed: :meth:`MMReader.get` returns the base weight with ``scale * B @ A``
merged in, :meth:`MMReader.lora_pair` the global ``A`` and ``B``, each TP-merged by its own split
(:func:`mm_omni.lora.merge.lora_split_kinds`; their product equals the shard products put together,
see :mod:`mm_omni.lora.merge`). ``scale = alpha / r`` comes from the adapters' checkpoint's saved
``args`` (``lora_alpha``, ``lora_r``) unless given.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable, Iterable

from torch import Tensor

from converters.common.layout import Layout, ModuleSpec, ep_globalize, is_expert, local_experts
from converters.common.mm_io import load_rank, rank_files, resolve_tag_dir, saved_args
from mm_omni.checkpoint import tp as tp_ops
from mm_omni.lora import merge as lora  # pure torch, no training stack

log = logging.getLogger(__name__)
RELEASE_BYTES = 512 * 2**20
BASE, ADAPTERS = 0, 1  # the checkpoints one reader reads: the model, and (optionally) a LoRA run's save over it


class MMReader:
    def __init__(self, path: Path, specs: Iterable[ModuleSpec], split_kind: Callable[[str], str],
                 full: dict[str, Tensor], optional: Iterable[str] = (), lora_alpha: float | None = None,
                 lora_r: int | None = None, lora_path: Path | None = None):
        self.tag_dir = resolve_tag_dir(Path(path))
        self.lora_tag_dir: Path | None = None
        self._files = {BASE: rank_files(self.tag_dir)}
        self.files = self._files[BASE]
        self.tp_files, self.pp, self.ep = (1 + max(k[i] for k in self.files) for i in range(3))
        self.specs, self.split_kind, self.full = tuple(specs), split_kind, full
        self._stage: int | None = None
        self._read_bytes = 0  # read from the open mappings since they were (re)opened
        self._loaded: dict[tuple[int, int, int], list[dict[str, Tensor]]] = {}  # (source, tp, ep) -> stage's chunks
        self._where: dict[str, tuple[int, int, int, int, str]] = {}  # global name -> (source, pp, ep, chunk, local)
        self._tp: dict[str, int] = {}
        self._lora: dict[str, tuple[str, str]] = {}  # base weight (global) -> its lora_A, lora_B (global)
        self._lora_tp: dict[str, int] = {}
        self.lora_scale: float | None = None
        self.lora_args = None  # the args saved beside the adapters (a dict, or MindSpeed's Namespace)
        self.layout = self._discover(set(optional))
        if lora_path is not None:
            self._add_adapters(Path(lora_path))
        if self._lora:
            args_of = self._files[ADAPTERS if lora_path is not None else BASE][(0, 0, 0)]
            self.lora_args = saved_args(args_of)
            self.lora_scale = lora.scale_from_args(self.lora_args, lora_alpha, lora_r)
            if self.lora_scale is None:
                raise ValueError(f"{args_of.parent.parent} holds LoRA adapters but its args give no lora_alpha / "
                                 "lora_r: pass --cfg.lora_alpha and --cfg.lora_r (the values used in training)")
            log.info("%d LoRA adapters (scale %g)", len(self._lora), self.lora_scale)

    def _rank(self, tp: int, pp: int, source: int = BASE, ep: int = 0) -> list[dict[str, Tensor]]:
        if self._stage != pp or self._read_bytes > RELEASE_BYTES:
            # drop our references to the open mappings: each is unmapped (its resident pages released)
            # once the tensors handed out from it are freed too
            self._loaded, self._stage, self._read_bytes = {}, pp, 0
        if (source, tp, ep) not in self._loaded:
            self._loaded[(source, tp, ep)] = load_rank(self._files[source][(tp, pp, ep)])
        return self._loaded[(source, tp, ep)]

    def _discover(self, optional: set[str]) -> Layout:
        counts: dict[str, list[list[int]]] = {}
        locals_: dict[tuple[int, int], list[str]] = {}
        vpp = None
        for p in range(self.pp):
            chunks = self._rank(0, p)
            if vpp is None:
                vpp = len(chunks)
                counts = {s.name: [[0] * self.pp for _ in range(vpp)] for s in self.specs}
                if all(lora.is_lora_key(k) for sd in chunks for k in sd if not k.endswith("._extra_state")):
                    raise ValueError(f"{self.tag_dir} holds only LoRA adapters (a LoRA run's save, no base weights): "
                                     "pass the base checkpoint that run loaded (its --load) in its place and this "
                                     "directory as --cfg.lora_load_dir")
            elif len(chunks) != vpp:
                raise ValueError(f"{self.files[(0, p, 0)]}: {len(chunks)} virtual-pipeline chunks, stage 0 has {vpp}")
            for v, sd in enumerate(chunks):
                names = [k for k in sd if not k.endswith("._extra_state")]
                locals_[(p, v)] = names
                for spec in self.specs:
                    layers = {int(m.group(1)) for k in names
                              if (m := re.match(re.escape(spec.layer_prefix) + r"(\d+)\.", k))}
                    if layers and layers != set(range(len(layers))):
                        raise ValueError(f"{self.files[(0, p, 0)]} chunk {v}: {spec.name} layers {sorted(layers)} "
                                         "are not numbered 0..n-1")
                    counts[spec.name][v][p] = len(layers)
        per_rank = {s.name: max((local_experts(s, names) for names in locals_.values()), default=0)
                    for s in self.specs}
        experts = {m: n * self.ep for m, n in per_rank.items() if n}
        layout = Layout(counts, {s.name: 1 for s in self.specs}, self.specs, self.ep, experts)
        for (p, v), names in locals_.items():
            for e in range(self.ep):
                for local in self._ep_names(p, v, e, names, layout):
                    spec = layout.spec_of(local)
                    name = layout.globalize(v * self.pp + p, ep_globalize(spec, e, per_rank[spec.name], local))
                    if name in self._where:
                        raise ValueError(f"{name} is stored twice in {self.tag_dir}")
                    self._where[name] = (BASE, p, e, v, local)
        self._pair_adapters(self.tag_dir)
        missing = sorted(set(self.full) - set(self._where))
        unknown = sorted(set(self._where) - set(self.full) - optional - {n for p in self._lora.values() for n in p})
        if missing or unknown:
            raise KeyError(f"{self.tag_dir} does not match the model config: missing {missing[:10]}"
                           f"{'...' if len(missing) > 10 else ''}, unexpected {unknown[:10]}"
                           f"{'...' if len(unknown) > 10 else ''}")
        for name in self.full:
            self._tp[name] = self._tensor_tp(name)
            module = layout.spec_of(name).name
            layout.tp[module] = max(layout.tp[module], self._tp[name])
        return layout

    def _ep_names(self, p: int, v: int, e: int, names: list[str], layout: Layout) -> list[str]:
        """The tensors EP rank ``e`` contributes to chunk ``v`` of stage ``p``: all of EP rank 0's, only the
        experts of any other (whose other tensors must be EP rank 0's, replicated)."""
        if e == 0:
            return names
        mine = [k for k in self._rank(0, p, ep=e)[v] if not k.endswith("._extra_state")]
        shared = sorted({k for k in mine if layout.ep_place(k)[0] is None}
                        ^ {k for k in names if layout.ep_place(k)[0] is None})
        if shared:
            raise ValueError(f"{self.files[(0, p, e)]} chunk {v}: the tensors outside the experts differ from "
                             f"EP rank 0's ({shared[:5]}); every EP rank holds the same ones")
        return [k for k in mine if layout.ep_place(k)[0] is not None]

    def _add_adapters(self, path: Path) -> None:
        """A LoRA run's adapter-only save over this (base) checkpoint; its non-LoRA tensors replace the base's."""
        if self._lora:
            raise ValueError(f"{self.tag_dir} holds LoRA adapters itself and lora_load_dir={path} gives adapters "
                             "too: give one of them")
        tag_dir = resolve_tag_dir(path)
        files = rank_files(tag_dir)
        pp, ep = 1 + max(k[1] for k in files), 1 + max(k[2] for k in files)
        if pp != self.pp:
            raise ValueError(f"lora_load_dir={path}: {pp} pipeline stages, the base {self.tag_dir} has {self.pp}: "
                             "give the base checkpoint that LoRA run loaded (its --load), in the same pipeline layout")
        self.lora_tag_dir, self._files[ADAPTERS] = tag_dir, files
        unknown, replaced = [], []
        for p in range(pp):
            chunks = self._rank(0, p, ADAPTERS)
            if len(chunks) != self.layout.vpp:
                raise ValueError(f"{files[(0, p, 0)]}: {len(chunks)} virtual-pipeline chunks, the base has "
                                 f"{self.layout.vpp}")
            for e in range(ep):  # expert parallel: EP rank e's experts (of every EP rank: the same other tensors)
                for v, sd in enumerate(self._rank(0, p, ADAPTERS, e)):
                    for local in (k for k in sd if not k.endswith("._extra_state")):
                        spec = self.layout.spec_of(local)
                        if e and not is_expert(spec, local):
                            continue
                        per_rank = self.layout.experts.get(spec.name, 0) // ep
                        name = self.layout.globalize(v * self.pp + p, ep_globalize(spec, e, per_rank, local))
                        if not lora.is_lora_key(name) and name not in self.full:
                            unknown.append(name)
                            continue
                        if name in self.full:
                            replaced.append(name)
                        self._where[name] = (ADAPTERS, p, e, v, local)
        if unknown:
            raise KeyError(f"lora_load_dir={path}: {tag_dir} holds tensors the model does not have: {unknown[:10]}")
        self._pair_adapters(tag_dir)
        if not self._lora:
            raise ValueError(f"lora_load_dir={path}: {tag_dir} holds no LoRA adapters (lora_A / lora_B weights)")
        for name in replaced:  # trained besides the adapters: this checkpoint's values win, as in training
            self._tp[name] = self._tensor_tp(name)
        if replaced:
            log.info("%d non-LoRA tensors of %s replace the base's (e.g. %s)", len(replaced), tag_dir, replaced[0])

    def _pair_adapters(self, where: Path) -> None:
        for name in [n for n in self._where if lora.is_lora_key(n)]:
            base = lora.base_key(name)
            pair = lora.lora_keys(base)
            if base not in self.full or not all(k in self._where for k in pair):
                raise KeyError(f"{where}: LoRA tensor {name} has no base weight {base} or no partner")
            if base not in self._lora:
                self._lora[base] = pair
                self._lora_tp[base] = self._adapter_tp(base)

    def _adapter_tp(self, base: str) -> int:
        """The TP size the adapter was saved with, from whichever of ``A`` / ``B`` is split."""
        a_name, b_name = self._lora[base]
        a_kind, b_kind = lora.lora_split_kinds(self.split_kind(base))
        out, inp = self.full[base].shape
        source, p, e, v, local = self._where[a_name if a_kind != "rep" else b_name]
        shard = self._rank(0, p, source, e)[v][local]
        if a_kind != "rep":
            return self._shard_count(a_name, tuple(shard.shape), (shard.shape[0], inp), a_kind, source, p)
        return self._shard_count(b_name, tuple(shard.shape), (out, shard.shape[1]), b_kind, source, p)

    def _tensor_tp(self, name: str) -> int:
        source, p, e, v, local = self._where[name]
        shard = self._rank(0, p, source, e)[v][local]
        return self._shard_count(name, tuple(shard.shape), tuple(self.full[name].shape), self.split_kind(name),
                                 source, p)

    def _shard_count(self, name: str, shard: tuple, full: tuple, kind: str, source: int, p: int) -> int:
        dim = tp_ops.split_dim(kind)
        if dim is None or shard == full:
            return 1
        tp_files = 1 + max(k[0] for k in self._files[source])
        size = full[dim] // shard[dim] if shard[dim] else 0
        ok = size and full[dim] == size * shard[dim] and tp_files % size == 0
        if not ok or shard[:dim] + shard[dim + 1:] != full[:dim] + full[dim + 1:]:
            raise ValueError(f"{name}: shard shape {shard} in {self._files[source][(0, p, 0)]} does not split "
                             f"the model's {full} over a TP size dividing {tp_files}")
        return size

    def names(self) -> list[str]:
        return list(self.full)

    def adapted(self) -> list[str]:
        """The base weights that have a LoRA adapter, in checkpoint order."""
        return list(self._lora)

    def _merged(self, name: str, kind: str, tp: int) -> Tensor:
        source, p, e, v, local = self._where[name]
        shards = [self._rank(t, p, source, e)[v][local] for t in range(tp)]
        self._read_bytes += sum(t.numel() * t.element_size() for t in shards)
        return tp_ops.merge(shards, kind)

    def lora_pair(self, base: str) -> tuple[Tensor, Tensor]:
        """The global ``(A [r, in], B [out, r])`` of ``base``'s adapter."""
        a_kind, b_kind = lora.lora_split_kinds(self.split_kind(base))
        a_name, b_name = self._lora[base]
        a = self._merged(a_name, a_kind, self._lora_tp[base])
        b = self._merged(b_name, b_kind, self._lora_tp[base])
        out, inp = self.full[base].shape
        if a.shape[1] != inp or b.shape[0] != out or a.shape[0] != b.shape[1]:
            raise ValueError(f"{base}: LoRA A {tuple(a.shape)} / B {tuple(b.shape)} do not fit the weight "
                             f"{tuple(self.full[base].shape)}")
        return a, b

    def get(self, name: str, merged: bool = True) -> Tensor:
        """The global tensor ``name`` (TP shards merged; replicated ranks beyond the module's TP unread),
        its LoRA adapter merged in unless ``merged=False``."""
        weight = self._merged(name, self.split_kind(name), self._tp[name])
        if merged and name in self._lora:
            a, b = self.lora_pair(name)
            weight = lora.merged_weight(weight, a, b, self.lora_scale)
        return weight
