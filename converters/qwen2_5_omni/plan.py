"""Checks and plans shared by the Qwen2.5-Omni commands; every error is raised before writing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from converters.common.hf_io import HFSource
from converters.common.layout import Layout
from converters.config import ParallelConfig, nested
from converters.qwen2_5_omni import keymap, spec

log = logging.getLogger(__name__)

HF_CONFIG_COPY = "hf_config.json"  # the HF config.json, kept beside the mm checkpoint for resplit
TIED_COPY = "text_decoder.output_layer.weight"
EMBEDDING = "text_decoder.embedding.word_embeddings.weight"


def make_layout(pc: ParallelConfig, thinker) -> Layout:
    """The layout ``pc`` asks for, after checking it against the model; all problems in one error."""
    layers = spec.layer_counts(thinker)
    counts = pc.counts(layers["audio"])
    errors = []
    shape = [len(c) for c in counts["text"]]
    for module, chunks in counts.items():
        option = spec.PP_OPTION[module]
        if [len(c) for c in chunks] != shape:
            errors.append(f"{option}={chunks} has chunk/stage lengths {[len(c) for c in chunks]} but llm_pp_layers "
                          f"has {shape}: give every module one count per stage (zeros where it has none)")
        total = sum(map(sum, chunks))
        if total != layers[module]:
            errors.append(f"{option}={chunks} sums to {total} but the {module} model has {layers[module]} layers")
    if not errors:
        layout = Layout(counts, pc.tp(), spec.MODULES)
        text_first = next((i for i, n in enumerate(layout.flat("text")) if n), 0)
        for enc in spec.ENCODERS:
            if layers[enc] and layout.last_stage(enc) > text_first:
                errors.append(f"{spec.PP_OPTION[enc]}={counts[enc]} has layers on stage {layout.last_stage(enc)} but "
                              f"the text decoder starts on stage {text_first} (llm_pp_layers={counts['text']}): "
                              "encoders must finish before the decoder starts, e.g. [[32,0,0,0]] with [[1,10,10,7]]")
    errors += spec.tp_errors(thinker, pc.tp())
    if errors:
        raise ValueError("invalid parallel_config:\n  " + "\n  ".join(errors))
    return layout


def check_same_layout(found: Layout, given: ParallelConfig | None, thinker, where: Path, option: str) -> None:
    if given is None:
        return
    want = given.counts(spec.layer_counts(thinker)["audio"])
    problems = [f"{spec.PP_OPTION[m]}: checkpoint {found.counts[m]}, {option} {nested(want[m])}"
                for m in found.counts if found.counts[m] != want[m]]
    problems += [f"{spec.TP_OPTION[m]}: checkpoint {found.tp[m]}, {option} {given.tp()[m]}"
                 for m in found.tp if found.tp[m] != given.tp()[m]]
    if problems:
        raise ValueError(f"{where} has a different layout than --cfg.{option} says (omit it to use the checkpoint's):"
                         "\n  " + "\n  ".join(problems))


def check_hf(src: HFSource, thinker) -> tuple[str, str]:
    """The HF files hold exactly the thinker transformers builds from config.json; returns (prefix, style)."""
    prefix, style = keymap.detect_style(src.keys())
    expected = spec.hf_meta_state(thinker)
    found = {keymap.to_canonical(keymap.split_prefix(k)[1]): k for k in src.keys() if keymap.is_thinker_key(k)}
    problems = []
    for canon, key in found.items():
        if canon not in expected:
            if not keymap.DERIVED_BUFFERS.match(canon):
                problems.append(f"unexpected tensor {key}")
        elif list(expected[canon].shape) != list(src.shape(key)):
            problems.append(f"{key}: shape {src.shape(key)} but config.json implies {list(expected[canon].shape)}")
    tied_alias = {"lm_head.weight"} if keymap.is_tied(thinker) else set()
    problems += [f"missing tensor {prefix}{c}" for c in expected if c not in found and c not in tied_alias]
    if problems:
        raise ValueError(f"{src.dir} is not a Qwen2.5-Omni checkpoint matching its config.json:\n  "
                         + "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else ""))
    return prefix, style


def mm_names(thinker, layout: Layout) -> list[str]:
    """Tensors to write; a tied model with the embedding and output on different stages gets a copy
    of the embedding as ``output_layer`` on the last stage (Megatron's tied-embedding layout)."""
    names = keymap.expected_mm_keys(thinker)
    if keymap.is_tied(thinker) and layout.first_stage("text") != layout.last_stage("text"):
        names.append(TIED_COPY)
    return names


def source_name(name: str, thinker) -> str:
    """The global tensor ``name`` is made from: the embedding for a tied model's output-layer copy."""
    return EMBEDDING if name == TIED_COPY and keymap.is_tied(thinker) else name


def model_json(thinker, layout: Layout) -> dict:
    """MindSpeed-MM's model.json for this architecture, with the layout written."""
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config

    cfg = from_hf_thinker_config(thinker)
    def pnl(module):
        return layout.counts[module][0] if layout.vpp == 1 else layout.counts[module]
    cfg.text_decoder.pipeline_num_layers = pnl("text")
    cfg.text_decoder.tp, cfg.text_decoder.pp = layout.tp["text"], layout.pp
    if cfg.image_encoder is not None:
        cfg.image_encoder.vision_encoder.pipeline_num_layers = pnl("vision")
        cfg.image_encoder.tp, cfg.image_encoder.pp = layout.tp["vision"], layout.pp
    if cfg.audio_encoder is not None:
        cfg.audio_encoder.audio_encoder.pipeline_num_layers = pnl("audio")
        cfg.audio_encoder.tp, cfg.audio_encoder.pp = layout.tp["audio"], layout.pp
    return cfg.model_dump(mode="json", exclude_none=True)


def write_side_files(dst: Path, thinker, layout: Layout, hf_config_json: str) -> None:
    (dst / "model.json").write_text(json.dumps(model_json(thinker, layout), indent=2) + "\n")
    (dst / HF_CONFIG_COPY).write_text(hf_config_json)


def load_thinker_config_text(config_json: str):
    """A config.json's text (full Qwen2.5-Omni or bare thinker) -> the transformers thinker config."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(**json.loads(config_json))
    return getattr(cfg, "thinker_config", cfg)
