"""Hugging Face safetensors checkpoints: lazy per-tensor reading, sharded writing, side files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from torch import Tensor

from converters.common.safetensors_stream import SafetensorsStreamWriter
from mm_omni.checkpoint.files import CONVERT_REMEDY, open_safetensors

INDEX = "model.safetensors.index.json"


class HFSource:
    """Names, shapes and tensors of an HF checkpoint; a tensor is read only when asked for."""

    def __init__(self, hf_dir: Path):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX
        if index.is_file():
            self.index = json.loads(index.read_text())
            self.weight_map: dict[str, str] = dict(self.index["weight_map"])
        else:
            self.index = None
            self.weight_map = {}
            for path in sorted(self.dir.glob("*.safetensors")):
                with open_safetensors(path, CONVERT_REMEDY) as f:
                    self.weight_map.update({k: path.name for k in f.keys()})
        missing = sorted({f for f in self.weight_map.values() if not (self.dir / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{self.dir}: {INDEX} names missing files {missing}")
        self._handles: dict[str, object] = {}

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = open_safetensors(self.dir / file, CONVERT_REMEDY)
        return self._handles[file]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, key: str) -> list[int]:
        return self._handle(self.weight_map[key]).get_slice(key).get_shape()

    def get(self, key: str) -> Tensor:
        # a file of its own per read: the copy is returned and the mapping closed, so the shard's
        # pages don't stay mapped (and counted in RSS) for the rest of the conversion
        with open_safetensors(self.dir / self.weight_map[key], CONVERT_REMEDY) as f:
            return f.get_tensor(key)

    def release(self) -> None:
        """Close the files: their mapped pages stop counting against this process."""
        self._handles.clear()

    def shards(self) -> dict[str, list[str]]:
        """{file: keys} in index order (the layout the output repeats)."""
        out: dict[str, list[str]] = {}
        for key, file in self.weight_map.items():
            out.setdefault(file, []).append(key)
        return out


def write_shards(src: HFSource, dst: Path, produce: Callable[[str], Tensor],
                 progress: Callable = lambda it, **kw: it) -> None:
    """Write ``dst`` with the same files / index as ``src``, each tensor from ``produce(key)``.

    Tensors are produced, written and dropped one at a time (see ``safetensors_stream``), so peak
    memory is about the largest tensor, not the largest shard.
    """
    total = 0
    for file, keys in progress(list(src.shards().items()), desc="hf shards", unit="file"):
        writer = SafetensorsStreamWriter(dst / file, metadata={"format": "pt"})
        for key in keys:
            tensor = produce(key)
            if list(tensor.shape) != list(src.shape(key)):
                raise ValueError(f"{file}: {key} produced with shape {list(tensor.shape)}, "
                                 f"the original is {src.shape(key)}")
            writer.add(key, tensor)
            del tensor
        writer.close()
        total += writer.nbytes
    if src.index is not None:
        index = dict(src.index)
        index["metadata"] = {**index.get("metadata", {}), "total_size": total}
        (dst / INDEX).write_text(json.dumps(index, indent=2, sort_keys=False) + "\n")


def copy_side_files(src_dir: Path, dst_dir: Path) -> list[str]:
    """Copy everything except the weights and their index (tokenizer, configs, speakers, ...)."""
    copied = []
    for p in sorted(Path(src_dir).iterdir()):
        if p.suffix == ".safetensors" or p.name == INDEX:
            continue
        target = dst_dir / p.name
        if p.is_dir():
            shutil.copytree(p, target)
        else:
            shutil.copy2(p, target)
        copied.append(p.name)
    return copied
