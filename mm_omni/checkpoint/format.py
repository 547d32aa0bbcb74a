"""The Megatron checkpoint layout (what Megatron, MindSpeed-MM's converter, training and mm-convert use)::

    <root>/latest_checkpointed_iteration.txt        "100" or "release" (the tracker: written last)
    <root>/{release | iter_0000100}/mp_rank_{tp:02d}[_{pp:03d}[_{ep:03d}]]/model_optim_rng.pt

``_{pp:03d}`` is there when pipeline parallelism splits the model, and with expert parallelism (EP > 1),
which adds ``_{ep:03d}``: each EP rank's file holds its share of the experts and a copy of every other
tensor (the three fields always, so ``mp_rank_00_001`` is never ambiguous). ``model_optim_rng.pt`` holds
``{"model": state_dict, "checkpoint_version": 3.0, ...}``, with virtual pipeline ``model0``, ``model1``...

Writes are atomic: files are fsynced, a directory is built under a temporary sibling and renamed into
place, the tracker is replaced by rename. A crash leaves the previous checkpoint and tracker as they were.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

log = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
RELEASE = "release"
CHECKPOINT_VERSION = 3.0
RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3})(?:_(\d{3}))?)?$")


# -- names ---------------------------------------------------------------------------------------------
def tag_dir_name(iteration: Optional[int]) -> str:
    """``release`` (None) or ``iter_NNNNNNN``."""
    return RELEASE if iteration is None else f"iter_{iteration:07d}"


def iteration_dir(root: Path, iteration: Optional[int]) -> Path:
    return Path(root) / tag_dir_name(iteration)


def tag_dir_of(tag: str) -> str:
    """The tracker's text (``release`` or an iteration number) -> the directory it names."""
    return RELEASE if tag == RELEASE else tag_dir_name(int(tag))


def rank_dir_name(tp_rank: int, pp_rank: int, pp_size: int, ep_rank: int = 0, ep_size: int = 1) -> str:
    """``mp_rank_TT``, ``mp_rank_TT_PPP`` (PP > 1) or ``mp_rank_TT_PPP_EEE`` (EP > 1, whatever the PP size)."""
    if ep_size > 1:
        return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}_{ep_rank:03d}"
    return f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def parse_rank_dir(name: str, with_ep: bool = False) -> Optional[tuple[int, ...]]:
    """``mp_rank_01_002`` -> (1, 2); ``mp_rank_01`` -> (1, 0); anything else -> None. ``with_ep``: a third
    number, the EP rank (0 for a name without one): ``mp_rank_01_002_003`` -> (1, 2, 3)."""
    m = RANK_DIR.match(name)
    if m is None:
        return None
    ranks = (int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0))
    return ranks if with_ep else ranks[:2]


def rank_file(tag_dir: Path, tp_rank: int, pp_rank: int, pp_size: int, ep_rank: int = 0, ep_size: int = 1) -> Path:
    return Path(tag_dir) / rank_dir_name(tp_rank, pp_rank, pp_size, ep_rank, ep_size) / MODEL_FILE


def chunk_keys(vpp: int) -> list[str]:
    """The model entries of a rank file: ``model``, or ``model0..N`` with virtual pipeline chunks."""
    return ["model"] if vpp == 1 else [f"model{i}" for i in range(vpp)]


# -- tracker -------------------------------------------------------------------------------------------
def read_tracker(root: Path) -> Optional[str]:
    tracker = Path(root) / TRACKER
    return tracker.read_text().strip() if tracker.is_file() else None


def write_tracker(root: Path, tag: str) -> None:
    """Point ``root``'s tracker at ``tag`` (``release`` or an iteration number), atomically."""
    atomic_write_text(Path(root) / TRACKER, str(tag))


# -- durable writes ------------------------------------------------------------------------------------
def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Every file and directory under ``root`` (and ``root``) on disk."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_file(Path(dirpath) / name)
        fsync_dir(Path(dirpath))


def save_synced(obj, path: Path) -> None:
    """``torch.save`` and fsync."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write a temp sibling, fsync, rename over ``path``, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename the finished directory ``tmp`` to ``final``; an existing ``final`` is moved aside first and
    removed once the new one is in place."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


@contextmanager
def atomic_dir(dst: Path) -> Iterator[Path]:
    """Yield a temp dir next to ``dst``; on success it is fsynced and replaces ``dst``, on error it is removed."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:  # any failure (incl. Ctrl-C): leave no partial output behind, then re-raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, dst)
    log.info("wrote %s", dst)
