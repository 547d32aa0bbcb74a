"""Megatron checkpoint files for the converter: whole rank files written and read back, the rank grid found.

The layout itself (names, tracker, atomic writes) is :mod:`mm_omni.checkpoint.format`'s. Each file the
converter writes is ``{"model": sd, "checkpoint_version": 3.0}``; with virtual pipeline ``model0``,
``model1``, ... (one per chunk).
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch
from torch import Tensor

from mm_omni.checkpoint.files import load_torch_file, read_checked
from mm_omni.checkpoint.format import (CHECKPOINT_VERSION, MODEL_FILE, TRACKER, chunk_keys, parse_rank_dir,
                                       rank_dir_name, rank_file, read_tracker, tag_dir_of)

log = logging.getLogger(__name__)
MM_REMEDY = ("take the previous iter_* directory of the run (write its number into latest_checkpointed_iteration.txt) "
             "or re-convert the checkpoint with mm-convert hf_to_mm")


def save_rank(tag_dir: Path, tp: int, pp: int, pp_size: int, chunks: list[dict[str, Tensor]], ep: int = 0,
              ep_size: int = 1) -> Path:
    path = rank_file(tag_dir, tp, pp, pp_size, ep, ep_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {key: sd for key, sd in zip(chunk_keys(len(chunks)), chunks)}
    payload["checkpoint_version"] = CHECKPOINT_VERSION
    torch.save(payload, path)
    return path


def resolve_tag_dir(path: Path) -> Path:
    """A checkpoint root (with the tracker file) or a ``release`` / ``iter_*`` dir -> the dir of rank dirs."""
    path = Path(path)
    tag = read_tracker(path)
    if tag is not None:
        sub = path / tag_dir_of(tag)
        if not sub.is_dir():
            raise FileNotFoundError(f"{path / TRACKER} says {tag!r} but {sub} does not exist")
        return sub
    if any(parse_rank_dir(p.name) for p in path.glob("mp_rank_*")):
        return path
    raise FileNotFoundError(f"{path}: not a Megatron checkpoint (no {TRACKER}, no mp_rank_* directories)")


def rank_files(tag_dir: Path) -> dict[tuple[int, int, int], Path]:
    """{(tp, pp, ep): file} of every rank (ep 0 without expert parallelism); raises if the grid has holes."""
    found = {}
    for p in tag_dir.iterdir():
        ranks = parse_rank_dir(p.name, with_ep=True)
        if ranks is not None and (p / MODEL_FILE).is_file():
            found[ranks] = p / MODEL_FILE
    if not found:
        raise FileNotFoundError(f"{tag_dir}: no mp_rank_*/{MODEL_FILE}")
    tps, pps, eps = (1 + max(r[i] for r in found) for i in range(3))
    missing = [rank_dir_name(t, p, pps, e, eps) for t in range(tps) for p in range(pps) for e in range(eps)
               if (t, p, e) not in found]
    if missing:
        raise FileNotFoundError(f"{tag_dir}: missing rank files {missing}")
    return found


def _read_rank_file(path: Path) -> dict:
    """A rank file, memory-mapped (pages are read only when a tensor is used); a damaged one is named."""
    try:
        return load_torch_file(path, MM_REMEDY, mmap=True)
    except pickle.UnpicklingError:
        # training checkpoints may pickle argparse objects; the file is the user's own local output
        log.warning("%s holds non-tensor objects; loading it with weights_only=False", path)
        return read_checked(path, lambda p: torch.load(p, map_location="cpu", weights_only=False, mmap=True),
                            MM_REMEDY)


def load_rank(path: Path) -> list[dict[str, Tensor]]:
    """The model chunks of one rank file."""
    payload = _read_rank_file(path)
    if "model" in payload:
        return [payload["model"]]
    keys = sorted((k for k in payload if re.fullmatch(r"model\d+", k)), key=lambda k: int(k[5:]))
    if not keys:
        raise KeyError(f"{path}: no 'model' or 'model0..N' entry (keys: {sorted(payload)[:10]})")
    return [payload[k] for k in keys]


def saved_args(path: Path):
    """The ``args`` a training run saved in a rank file (a dict, or MindSpeed's Namespace), or None."""
    return _read_rank_file(path).get("args")
