"""Shared helpers of the converter tests: run a command, read checkpoints back."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from converters.config import HfToMmConfig, MmToHfConfig, ResplitConfig
from mm_omni.models.qwen2_5_omni.converter import Qwen2_5_OmniConverter


def layout(llm, vit, audio, tp=1, vit_tp=0, audio_tp=0) -> dict:
    return dict(llm_pp_layers=llm, vit_pp_layers=vit, audio_pp_layers=audio, tp_size=tp, vit_tp_size=vit_tp,
                audio_tp_size=audio_tp)


def hf_to_mm(hf_dir: Path, mm_dir: Path, pc: dict, **kw) -> Path:
    Qwen2_5_OmniConverter.hf_to_mm(HfToMmConfig(mm_dir=mm_dir, hf_config={"hf_dir": hf_dir}, parallel_config=pc, **kw))
    return mm_dir


def mm_to_hf(mm_dir: Path, hf_dir: Path, out: Path, pc: dict | None = None, **kw) -> Path:
    Qwen2_5_OmniConverter.mm_to_hf(MmToHfConfig(mm_dir=mm_dir, hf_config={"hf_dir": hf_dir}, save_hf_dir=out,
                                                parallel_config=pc, **kw))
    return out


def resplit(src: Path, dst: Path, pc: dict, **kw) -> Path:
    Qwen2_5_OmniConverter.resplit(ResplitConfig(source_dir=src, target_dir=dst, target_parallel_config=pc, **kw))
    return dst


def load_hf(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def load_mm(mm_dir: Path) -> dict[str, dict]:
    """{rank dir name: payload} of every file under release/."""
    return {p.parent.name: torch.load(p, weights_only=True) for p in sorted((mm_dir / "release").glob("*/*.pt"))}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:10]
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def assert_same_hf_dirs(a: Path, b: Path) -> None:
    """Bit-identical tensors, same shard files and index, same side files."""
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for f in a.glob("*.safetensors"):
        assert_same_tensors(load_file(f), load_file(b / f.name))
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    import json
    ia, ib = (json.loads((d / "model.safetensors.index.json").read_text()) for d in (a, b))
    assert ia["weight_map"] == ib["weight_map"]
