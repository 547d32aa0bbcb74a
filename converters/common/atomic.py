"""Atomic output directories: everything is written into a temp sibling, fsynced, then renamed.

A crash leaves either the old directory or the new one, never a half-written checkpoint that a
training run could pick up.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


def check_output_dir(dst: Path, overwrite: bool, option: str, sources: tuple[Path, ...] = ()) -> None:
    """Fail before any work if ``dst`` cannot be (re)written."""
    dst = Path(dst)
    resolved = dst.resolve()
    for src in sources:
        src = Path(src).resolve()
        if resolved == src or src in resolved.parents or resolved in src.parents:
            raise ValueError(f"{option}={dst} overlaps the input {src}: write the output somewhere else")
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"{option}={dst} is a file, not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{option}={dst} is not empty; pass --cfg.overwrite true to replace it")


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_file(Path(dirpath) / name)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_dir(dst: Path) -> Iterator[Path]:
    """Yield a temp dir next to ``dst``; on success it replaces ``dst``, on error it is removed."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:  # any failure (incl. Ctrl-C): leave no partial output behind, then re-raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old)
    else:
        tmp.rename(dst)
    log.info("wrote %s", dst)
