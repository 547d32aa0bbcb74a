"""``mm-convert <Converter> {hf_to_mm, mm_to_hf, resplit}`` for any family's converter spec.

A family exposes ``converter_class(SPEC)`` as its registry ``converter_ref``; the commands below do the
work, parameterised by the spec (:mod:`mm_omni.checkpoint.spec`). Nothing here names a family.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from torch import Tensor

from converters.common.atomic import check_output_dir
from converters.common.hf_io import HFSource, copy_side_files, write_shards
from converters.common.mm_reader import MMReader
from converters.common.mm_writer import cast, write_layout
from converters.common.plan import HF_CONFIG_COPY, Plan, load_config_text
from converters.config import HfConfig, HfToMmConfig, MmToHfConfig, ResplitConfig
from mm_omni.checkpoint.format import RELEASE, atomic_dir, write_tracker
from mm_omni.checkpoint.spec import ConverterSpec

log = logging.getLogger(__name__)


def _progress(items, **kw):
    from tqdm import tqdm

    return tqdm(items, **kw)


def open_mm(plan: Plan, path: Path, cfg=None) -> MMReader:
    """``cfg``'s ``lora_alpha`` / ``lora_r`` (if any) override a LoRA checkpoint's saved args; its
    ``lora_load_dir`` (if any) is an adapter-only checkpoint read over ``path``."""
    return MMReader(path, plan.spec.modules, plan.split_kind, plan.mm_meta_state(), plan.optional_mm_names(),
                    lora_alpha=getattr(cfg, "lora_alpha", None), lora_r=getattr(cfg, "lora_r", None),
                    lora_path=getattr(cfg, "lora_load_dir", None))


def _check_model_type(spec: ConverterSpec, model_type, where: str) -> None:
    if model_type not in spec.hf_model_types:
        from mm_omni.registry import for_hf_model_type

        family = for_hf_model_type(model_type, source=where)
        raise ValueError(f"{where} has model_type={model_type!r}, a {family.title} checkpoint, not a {spec.title} one "
                         f"(model_type {' / '.join(spec.hf_model_types)}): use mm-convert {family.converter}")


def _plan(spec: ConverterSpec, hf_config: HfConfig) -> Plan:
    """The spec applied to hf_dir's config, once its model_type is this converter's."""
    _check_model_type(spec, hf_config.model_type, f"hf_dir={hf_config.hf_dir}: config.json")
    return Plan(spec, spec.sub_config(hf_config.config))


def hf_to_mm(spec: ConverterSpec, cfg: HfToMmConfig) -> None:
    start = time.perf_counter()
    plan = _plan(spec, cfg.hf_config)
    spec.check_config(plan.cfg)  # config values we do not implement fail here, before any tensor is read
    if cfg.test_convert_precision and spec.precision is None:
        raise ValueError(f"test_convert_precision=true: no precision check is defined for {spec.title}")
    src = HFSource(cfg.hf_config.hf_dir)
    prefix, style = plan.check_hf(src)
    layout = plan.make_layout(cfg.parallel_config)
    check_output_dir(cfg.mm_dir, cfg.overwrite, "mm_dir", sources=(cfg.hf_config.hf_dir,))

    def fetch(names: list[str]) -> dict[str, Tensor]:
        wanted = [plan.source_name(n) for n in names]
        canon = {h: src.get(plan.names.from_canonical(h, style, prefix)) for n in wanted for h in plan.by_mm[n].hf}
        src.release()  # get_tensor copied what this stage needs; drop the mappings
        mm = plan.hf_to_mm(canon)
        return {n: mm[w] for n, w in zip(names, wanted)}

    with atomic_dir(cfg.mm_dir) as tmp:
        write_layout(tmp / RELEASE, layout, plan.mm_names(layout), fetch, plan.split_kind, cfg.dtype)
        plan.write_side_files(tmp, layout, (cfg.hf_config.hf_dir / "config.json").read_text())
        write_tracker(tmp, RELEASE)  # last: a checkpoint is complete once the tracker exists
    log.info("hf_to_mm: %s -> %s (tp %s, pp %d, vpp %d, ep %d) in %.1fs", cfg.hf_config.hf_dir, cfg.mm_dir,
             layout.tp, layout.pp, layout.vpp, layout.ep, time.perf_counter() - start)
    if cfg.test_convert_precision:
        from converters.common.precision import check_precision

        check_precision(plan, cfg.hf_config.hf_dir, cfg.mm_dir)


def mm_to_hf(spec: ConverterSpec, cfg: MmToHfConfig) -> None:
    start = time.perf_counter()
    plan = _plan(spec, cfg.hf_config)
    src = HFSource(cfg.hf_config.hf_dir)
    prefix, style = plan.check_hf(src)
    inputs = (cfg.hf_config.hf_dir, cfg.mm_dir) + ((cfg.lora_load_dir,) if cfg.lora_load_dir else ())
    check_output_dir(cfg.save_hf_dir, cfg.overwrite, "save_hf_dir", sources=inputs)
    reader = open_mm(plan, cfg.mm_dir, cfg)  # LoRA adapters, if any, merged into their weights
    plan.check_same_layout(reader.layout, cfg.parallel_config, reader.tag_dir, "parallel_config")
    if cfg.save_lora_as_peft:
        from converters.common.lora_export import write_peft

        with atomic_dir(cfg.save_hf_dir) as tmp:
            n = write_peft(plan, reader, src, prefix, style, tmp, cfg)
        log.info("mm_to_hf: %d LoRA adapters of %s -> PEFT adapter %s in %.1fs", n,
                 reader.lora_tag_dir or reader.tag_dir, cfg.save_hf_dir, time.perf_counter() - start)
        return
    pending: dict[str, Tensor] = {}  # HF tensors made with a sibling that lives in another shard

    def produce(key: str) -> Tensor:
        canon = plan.names.canonical(key)
        if not plan.names.is_model_key(key) or plan.derived.match(canon):
            return src.get(key)  # other models' tensors / config-derived buffers: as they were
        if plan.tied and canon == plan.spec.tie.hf_alias and canon not in plan.by_hf:
            return cast(reader.get(plan.spec.tie.embedding), cfg.dtype)  # tied alias stored in the original
        if canon not in pending:
            rule = plan.by_hf[canon]
            pending.update(plan.mm_to_hf({rule.mm: reader.get(rule.mm)}, style="hub"))
        return cast(pending.pop(canon), cfg.dtype)

    with atomic_dir(cfg.save_hf_dir) as tmp:
        write_shards(src, tmp, produce, _progress)
        copy_side_files(cfg.hf_config.hf_dir, tmp)
    if pending:
        raise RuntimeError(f"internal: converted tensors left unwritten: {sorted(pending)[:5]}")
    log.info("mm_to_hf: %s -> %s in %.1fs", reader.tag_dir, cfg.save_hf_dir, time.perf_counter() - start)


def resplit(spec: ConverterSpec, cfg: ResplitConfig) -> None:
    start = time.perf_counter()
    if cfg.hf_config is not None:
        plan = _plan(spec, cfg.hf_config)
        config_json = (cfg.hf_config.hf_dir / "config.json").read_text()
    elif (cfg.source_dir / HF_CONFIG_COPY).is_file():
        config_json = (cfg.source_dir / HF_CONFIG_COPY).read_text()
        full = load_config_text(config_json)
        _check_model_type(spec, full.model_type, f"source_dir={cfg.source_dir}: {HF_CONFIG_COPY}")
        plan = Plan(spec, spec.sub_config(full))
    else:
        raise FileNotFoundError(f"source_dir={cfg.source_dir} has no {HF_CONFIG_COPY} (written by hf_to_mm):"
                                " pass --cfg.hf_config.hf_dir with the model's config.json")
    layout = plan.make_layout(cfg.target_parallel_config)
    inputs = (cfg.source_dir,) + ((cfg.lora_load_dir,) if cfg.lora_load_dir else ())
    check_output_dir(cfg.target_dir, cfg.overwrite, "target_dir", sources=inputs)
    reader = open_mm(plan, cfg.source_dir, cfg)  # LoRA adapters, if any, merged (a plain checkpoint)
    plan.check_same_layout(reader.layout, cfg.source_parallel_config, reader.tag_dir, "source_parallel_config")

    def fetch(names: list[str]) -> dict[str, Tensor]:
        return {n: reader.get(plan.source_name(n)) for n in names}

    with atomic_dir(cfg.target_dir) as tmp:
        write_layout(tmp / RELEASE, layout, plan.mm_names(layout), fetch, plan.split_kind, cfg.dtype)
        plan.write_side_files(tmp, layout, config_json)
        write_tracker(tmp, RELEASE)
    log.info("resplit: %s -> %s (tp %s, pp %d, vpp %d, ep %d) in %.1fs", reader.tag_dir, cfg.target_dir,
             layout.tp, layout.pp, layout.vpp, layout.ep, time.perf_counter() - start)


def converter_class(spec: ConverterSpec, doc: str) -> type:
    """The class ``mm-convert`` exposes for ``spec`` (named ``spec.converter``): three static commands."""

    def _hf_to_mm(cfg: HfToMmConfig) -> None:
        """Hugging Face checkpoint -> Megatron layout (TP / PP / VPP / per-module TP) + model.json."""
        hf_to_mm(spec, cfg)

    def _mm_to_hf(cfg: MmToHfConfig) -> None:
        """Megatron checkpoint (release or iter_*) -> Hugging Face, overlaid on hf_dir's original files
        (or, with save_lora_as_peft, its LoRA adapters alone as a PEFT adapter for hf_dir's model)."""
        mm_to_hf(spec, cfg)

    def _resplit(cfg: ResplitConfig) -> None:
        """Megatron checkpoint -> the same weights in another layout (no Hugging Face weights read)."""
        resplit(spec, cfg)

    members = {"__doc__": doc, "__module__": __name__, "spec": spec}
    for name, fn in (("hf_to_mm", _hf_to_mm), ("mm_to_hf", _mm_to_hf), ("resplit", _resplit)):
        fn.__name__ = fn.__qualname__ = name
        members[name] = staticmethod(fn)
    return type(spec.converter, (), members)
