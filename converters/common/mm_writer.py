"""Write global (TP1, PP1) tensors into a Megatron layout, one rank file at a time.

Peak memory is one rank's shards plus one global tensor: for each rank file every tensor of its
stage is fetched, cut to the rank's shard and dropped. With TP > 1 a tensor is fetched once per TP
rank (from the page cache after the first read): a stage held whole measured 4.9 GB peak RSS on a
half-depth 7B (TP2/PP4) where this holds ~one rank file. With expert parallelism a file holds one EP
rank's experts and every other tensor of the stage (fetched again for each EP rank).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor
from tqdm import tqdm

from converters.common.layout import Layout
from converters.common.mm_io import save_rank
from mm_omni.checkpoint import tp as tp_ops

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
    per_stage: dict[int, list[tuple[int, int | None, str, str]]] = {p: [] for p in range(layout.pp)}
    for name in names:
        stage, local = layout.place(name)
        v, p = divmod(stage, layout.pp)
        ep_rank, local = layout.ep_place(local)
        per_stage[p].append((v, ep_rank, name, local))
    bar = tqdm(total=layout.pp * layout.tp_files * layout.ep, desc="mm rank files", unit="file")
    for p in range(layout.pp):
        for rank in range(layout.tp_files):
            for ep_rank in range(layout.ep):
                chunks: list[dict[str, Tensor]] = [{} for _ in range(layout.vpp)]
                for v, owner, name, local in per_stage[p]:
                    if owner not in (None, ep_rank):
                        continue
                    size = layout.tp[layout.spec_of(name).name]
                    full = cast(fetch([name])[name], dtype)
                    chunks[v][local] = _owned(tp_ops.shard(full, split_kind(name), size, rank % size))
                    del full
                path = save_rank(tag_dir, rank, p, layout.pp, chunks, ep_rank, layout.ep)
                bar.set_postfix_str(path.parent.name)
                bar.update()
                del chunks
    bar.close()
