"""``mm-convert Qwen2_5_OmniConverter {hf_to_mm, mm_to_hf, resplit}``."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from torch import Tensor

from converters.common.atomic import atomic_dir, check_output_dir
from converters.common.hf_io import HFSource, copy_side_files, write_shards
from converters.common.mm_io import write_tracker
from converters.common.mm_reader import MMReader
from converters.common.mm_writer import cast, write_layout
from converters.config import HfToMmConfig, MmToHfConfig, ResplitConfig
from converters.qwen2_5_omni import keymap, plan, spec
from mm_omni.models.qwen2_5_omni.hf_fields import check_thinker_config

log = logging.getLogger(__name__)


def _progress(items, **kw):
    from tqdm import tqdm

    return tqdm(items, **kw)


def open_mm(path: Path, thinker, cfg=None) -> MMReader:
    """``cfg``'s ``lora_alpha`` / ``lora_r`` (if any) override a LoRA checkpoint's saved args; its
    ``lora_load_dir`` (if any) is an adapter-only checkpoint read over ``path``."""
    optional = {plan.TIED_COPY} if keymap.is_tied(thinker) else set()
    return MMReader(path, spec.MODULES, spec.split_kind, spec.mm_meta_state(thinker), optional,
                    lora_alpha=getattr(cfg, "lora_alpha", None), lora_r=getattr(cfg, "lora_r", None),
                    lora_path=getattr(cfg, "lora_load_dir", None))


class Qwen2_5_OmniConverter:
    """Qwen2.5-Omni thinker: Hugging Face <-> Megatron (MindSpeed-MM layout). talker/token2wav stay in HF."""

    @staticmethod
    def hf_to_mm(cfg: HfToMmConfig) -> None:
        """Hugging Face checkpoint -> Megatron layout (TP / PP / VPP / per-module TP) + model.json."""
        start = time.perf_counter()
        thinker = cfg.hf_config.thinker
        check_thinker_config(thinker)  # config values we do not implement fail here, before any tensor is read
        src = HFSource(cfg.hf_config.hf_dir)
        prefix, style = plan.check_hf(src, thinker)
        layout = plan.make_layout(cfg.parallel_config, thinker)
        check_output_dir(cfg.mm_dir, cfg.overwrite, "mm_dir", sources=(cfg.hf_config.hf_dir,))
        table = {r.mm: r for r in keymap.rules(thinker)}

        def fetch(names: list[str]) -> dict[str, Tensor]:
            wanted = [plan.source_name(n, thinker) for n in names]
            canon = {h: src.get(keymap.from_canonical(h, style, prefix)) for n in wanted for h in table[n].hf}
            src.release()  # get_tensor copied what this stage needs; drop the mappings
            mm = keymap.hf_to_mm(canon, thinker)
            return {n: mm[w] for n, w in zip(names, wanted)}

        with atomic_dir(cfg.mm_dir) as tmp:
            write_layout(tmp / "release", layout, plan.mm_names(thinker, layout), fetch, spec.split_kind, cfg.dtype)
            plan.write_side_files(tmp, thinker, layout, (cfg.hf_config.hf_dir / "config.json").read_text())
            write_tracker(tmp, "release")  # last: a checkpoint is complete once the tracker exists
        log.info("hf_to_mm: %s -> %s (tp %s, pp %d, vpp %d) in %.1fs", cfg.hf_config.hf_dir, cfg.mm_dir,
                 layout.tp, layout.pp, layout.vpp, time.perf_counter() - start)
        if cfg.test_convert_precision:
            from converters.qwen2_5_omni.precision import check_precision

            check_precision(cfg.hf_config.hf_dir, cfg.mm_dir, thinker)

    @staticmethod
    def mm_to_hf(cfg: MmToHfConfig) -> None:
        """Megatron checkpoint (release or iter_*) -> Hugging Face, overlaid on hf_dir's original files
        (or, with save_lora_as_peft, its LoRA adapters alone as a PEFT adapter for hf_dir's thinker)."""
        start = time.perf_counter()
        thinker = cfg.hf_config.thinker
        src = HFSource(cfg.hf_config.hf_dir)
        prefix, style = plan.check_hf(src, thinker)
        inputs = (cfg.hf_config.hf_dir, cfg.mm_dir) + ((cfg.lora_load_dir,) if cfg.lora_load_dir else ())
        check_output_dir(cfg.save_hf_dir, cfg.overwrite, "save_hf_dir", sources=inputs)
        reader = open_mm(cfg.mm_dir, thinker, cfg)  # LoRA adapters, if any, merged into their weights
        plan.check_same_layout(reader.layout, cfg.parallel_config, thinker, reader.tag_dir, "parallel_config")
        if cfg.save_lora_as_peft:
            from converters.qwen2_5_omni.lora_export import write_peft

            with atomic_dir(cfg.save_hf_dir) as tmp:
                n = write_peft(reader, thinker, src, prefix, style, tmp, cfg)
            log.info("mm_to_hf: %d LoRA adapters of %s -> PEFT adapter %s in %.1fs", n,
                     reader.lora_tag_dir or reader.tag_dir, cfg.save_hf_dir, time.perf_counter() - start)
            return
        by_hf = {h: r for r in keymap.rules(thinker) for h in r.hf}
        pending: dict[str, Tensor] = {}  # HF tensors made with a sibling that lives in another shard

        def produce(key: str) -> Tensor:
            local = keymap.split_prefix(key)[1]
            canon = keymap.to_canonical(local)
            if not keymap.is_thinker_key(key) or keymap.DERIVED_BUFFERS.match(canon):
                return src.get(key)  # talker / token2wav / config-derived buffers: as they were
            if canon == "lm_head.weight" and canon not in by_hf:  # tied alias stored in the original
                return cast(reader.get(plan.EMBEDDING), cfg.dtype)
            if canon not in pending:
                rule = by_hf[canon]
                pending.update(keymap.mm_to_hf({rule.mm: reader.get(rule.mm)}, thinker, style="hub"))
            return cast(pending.pop(canon), cfg.dtype)

        with atomic_dir(cfg.save_hf_dir) as tmp:
            write_shards(src, tmp, produce, _progress)
            copy_side_files(cfg.hf_config.hf_dir, tmp)
        if pending:
            raise RuntimeError(f"internal: converted tensors left unwritten: {sorted(pending)[:5]}")
        log.info("mm_to_hf: %s -> %s in %.1fs", reader.tag_dir, cfg.save_hf_dir, time.perf_counter() - start)

    @staticmethod
    def resplit(cfg: ResplitConfig) -> None:
        """Megatron checkpoint -> the same weights in another layout (no Hugging Face weights read)."""
        start = time.perf_counter()
        if cfg.hf_config is not None:
            config_json = (cfg.hf_config.hf_dir / "config.json").read_text()
        elif (cfg.source_dir / plan.HF_CONFIG_COPY).is_file():
            config_json = (cfg.source_dir / plan.HF_CONFIG_COPY).read_text()
        else:
            raise FileNotFoundError(f"source_dir={cfg.source_dir} has no {plan.HF_CONFIG_COPY} (written by hf_to_mm):"
                                    " pass --cfg.hf_config.hf_dir with the model's config.json")
        thinker = plan.load_thinker_config_text(config_json)
        layout = plan.make_layout(cfg.target_parallel_config, thinker)
        inputs = (cfg.source_dir,) + ((cfg.lora_load_dir,) if cfg.lora_load_dir else ())
        check_output_dir(cfg.target_dir, cfg.overwrite, "target_dir", sources=inputs)
        reader = open_mm(cfg.source_dir, thinker, cfg)  # LoRA adapters, if any, merged (a plain checkpoint)
        plan.check_same_layout(reader.layout, cfg.source_parallel_config, thinker, reader.tag_dir,
                               "source_parallel_config")

        def fetch(names: list[str]) -> dict[str, Tensor]:
            return {n: reader.get(plan.source_name(n, thinker)) for n in names}

        with atomic_dir(cfg.target_dir) as tmp:
            write_layout(tmp / "release", layout, plan.mm_names(thinker, layout), fetch, spec.split_kind, cfg.dtype)
            plan.write_side_files(tmp, thinker, layout, config_json)
            write_tracker(tmp, "release")
        log.info("resplit: %s -> %s (tp %s, pp %d, vpp %d) in %.1fs", reader.tag_dir, cfg.target_dir,
                 layout.tp, layout.pp, layout.vpp, time.perf_counter() - start)
