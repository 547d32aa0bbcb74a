"""Output directories of the converter: refused before any work when they cannot be (re)written.

The writing itself is atomic (:func:`mm_omni.checkpoint.format.atomic_dir`: a temp sibling, fsynced, then
renamed), so a crash leaves either the old directory or the new one, never a half-written checkpoint
that a training run could pick up.
"""

from __future__ import annotations

from pathlib import Path


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
