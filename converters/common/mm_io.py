"""Megatron checkpoint files: ``<root>/{release|iter_XXXXXXX}/mp_rank_TT[_PPP]/model_optim_rng.pt``.

Each file is ``{"model": sd, "checkpoint_version": 3.0}``; with virtual pipeline ``model0``,
``model1``, ... (one per chunk). ``latest_checkpointed_iteration.txt`` names the tag, written last.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch
from torch import Tensor

from converters.common.atomic import fsync_file
from mm_omni.checkpoint_file import load_torch_file, read_checked

log = logging.getLogger(__name__)
MM_REMEDY = ("take the previous iter_* directory of the run (write its number into latest_checkpointed_iteration.txt) "
             "or re-convert the checkpoint with mm-convert hf_to_mm")

TRACKER = "latest_checkpointed_iteration.txt"
FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


def rank_dir(tp: int, pp: int, pp_size: int) -> str:
    return f"mp_rank_{tp:02d}" if pp_size == 1 else f"mp_rank_{tp:02d}_{pp:03d}"


def chunk_keys(vpp: int) -> list[str]:
    return ["model"] if vpp == 1 else [f"model{i}" for i in range(vpp)]


def save_rank(tag_dir: Path, tp: int, pp: int, pp_size: int, chunks: list[dict[str, Tensor]]) -> Path:
    path = tag_dir / rank_dir(tp, pp, pp_size) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {key: sd for key, sd in zip(chunk_keys(len(chunks)), chunks)}
    payload["checkpoint_version"] = CHECKPOINT_VERSION
    torch.save(payload, path)
    return path


def write_tracker(root: Path, tag: str = "release") -> None:
    path = root / TRACKER
    path.write_text(tag)
    fsync_file(path)


def resolve_tag_dir(path: Path) -> Path:
    """A checkpoint root (with the tracker file) or a ``release`` / ``iter_*`` dir -> the dir of rank dirs."""
    path = Path(path)
    tracker = path / TRACKER
    if tracker.is_file():
        tag = tracker.read_text().strip()
        sub = path / ("release" if tag == "release" else f"iter_{int(tag):07d}")
        if not sub.is_dir():
            raise FileNotFoundError(f"{tracker} says {tag!r} but {sub} does not exist")
        return sub
    if any(_RANK_DIR.match(p.name) for p in path.glob("mp_rank_*")):
        return path
    raise FileNotFoundError(f"{path}: not a Megatron checkpoint (no {TRACKER}, no mp_rank_* directories)")


def rank_files(tag_dir: Path) -> dict[tuple[int, int], Path]:
    """{(tp, pp): file} of every rank; raises if the grid has holes."""
    found = {}
    for p in tag_dir.iterdir():
        m = _RANK_DIR.match(p.name)
        if m and (p / FILE).is_file():
            found[(int(m.group(1)), int(m.group(2) or 0))] = p / FILE
    if not found:
        raise FileNotFoundError(f"{tag_dir}: no mp_rank_*/{FILE}")
    tps = 1 + max(t for t, _ in found)
    pps = 1 + max(p for _, p in found)
    missing = [rank_dir(t, p, pps) for t in range(tps) for p in range(pps) if (t, p) not in found]
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
