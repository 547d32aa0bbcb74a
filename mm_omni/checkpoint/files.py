"""Reading one checkpoint file so that a damaged one is named, not reported as a zip-archive error.

torch reports a truncated ``.pt`` file as ``PytorchStreamReader failed reading zip archive: failed finding
central directory`` and safetensors a cut-off shard as a header or slice error: neither names the file nor
what to do. Every reader of a checkpoint file (training's resume, the converter's inputs) goes through here.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from safetensors import SafetensorError, safe_open

T = TypeVar("T")

# What a cut-off or overwritten file raises inside torch.load / safetensors: zip and pickle stream errors,
# a short read, or safetensors' own header/offset errors.
_DAMAGE_ERRORS = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError,
                  SafetensorError)


class DamagedCheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read: truncated, overwritten or not a checkpoint at all."""


def damaged(path: Path, err: BaseException, remedy: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(
        f"{path}: checkpoint file is damaged or truncated ({type(err).__name__}: {str(err).strip()[:200]}); {remedy}"
    )


def read_checked(path: Path, read: Callable[[Path], T], remedy: str) -> T:
    """``read(path)``, turning a read error of an existing file into :class:`DamagedCheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file; {remedy}")
    try:
        return read(path)
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err):  # a readable file holding objects outside the safe set: not damage
            raise
        raise damaged(path, err, remedy) from err
    except _DAMAGE_ERRORS as err:
        raise damaged(path, err, remedy) from err


def load_torch_file(path: Path, remedy: str, *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; a damaged file raises :class:`DamagedCheckpointError`."""
    return read_checked(path, lambda p: torch.load(p, map_location="cpu", weights_only=True, mmap=mmap), remedy)


def open_safetensors(path: Path, remedy: str):
    """``safe_open(path)``; a cut-off file (its header names bytes the file lacks) is named as damaged."""
    return read_checked(path, lambda p: safe_open(p, "pt"), remedy)


RESUME_REMEDY = ("resume from the previous iter_* directory (write its number into "
                 "latest_checkpointed_iteration.txt) or re-convert the checkpoint with mm-convert")
CONVERT_REMEDY = "re-download or re-convert this checkpoint"
