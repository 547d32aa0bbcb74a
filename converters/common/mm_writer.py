"""Write global (TP1, PP1) tensors into a Megatron layout, one pipeline stage at a time.

Peak memory is one stage's global tensors plus one rank's shards: a stage is fetched, each TP
rank's file is cut from it and saved, then the stage is dropped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor
from tqdm import tqdm

from converters.common import tp as tp_ops
from converters.common.layout import Layout
from converters.common.mm_io import save_rank

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cast(t: Tensor, dtype: Optional[str]) -> Tensor:
    """``--cfg.dtype``: floating tensors only (integer buffers keep their type)."""
    return t.to(DTYPES[dtype]) if dtype and t.is_floating_point() else t


def _owned(t: Tensor) -> Tensor:
    # torch.save writes a view's whole storage: give each shard its own
    return t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t


def write_layout(tag_dir: Path, layout: Layout, names: list[str], fetch: Callable[[list[str]], dict[str, Tensor]],
                 split_kind: Callable[[str], str], dtype: Optional[str] = None) -> None:
    per_stage: dict[int, list[tuple[int, str, str]]] = {p: [] for p in range(layout.pp)}
    for name in names:
        stage, local = layout.place(name)
        v, p = divmod(stage, layout.pp)
        per_stage[p].append((v, name, local))
    bar = tqdm(total=layout.pp * layout.tp_files, desc="mm rank files", unit="file")
    for p in range(layout.pp):
        entries = per_stage[p]
        tensors = {k: cast(t, dtype) for k, t in fetch([name for _, name, _ in entries]).items()}
        for rank in range(layout.tp_files):
            chunks: list[dict[str, Tensor]] = [{} for _ in range(layout.vpp)]
            for v, name, local in entries:
                size = layout.tp[layout.spec_of(name).name]
                chunks[v][local] = _owned(tp_ops.shard(tensors[name], split_kind(name), size, rank % size))
            path = save_rank(tag_dir, rank, p, layout.pp, chunks)
            bar.set_postfix_str(path.parent.name)
            bar.update()
            del chunks
        del tensors
    bar.close()
