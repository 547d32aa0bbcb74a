"""Write a safetensors file one tensor at a time, so a shard is never held in memory whole.

``safetensors.torch.save_file`` serialises the whole dict into one buffer (a 4 GB shard costs ~8 GB
of RAM with its tensors). The format is simple (little-endian u64 header length, a JSON header of
dtype / shape / byte offsets, then the raw bytes), but the header comes first and the dtypes of the
tensors are only known once they are produced. So the bytes go to a sibling temp file as each tensor
is produced and dropped; ``close`` writes the header and appends the bytes with a kernel-side copy.
The result is read back by the official ``safe_open`` in the tests (round trips compare every tensor).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from torch import Tensor

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


class SafetensorsStreamWriter:
    def __init__(self, path: Path, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._data_path = self.path.with_name(self.path.name + ".data")
        self._data = open(self._data_path, "wb")
        self._header: dict[str, dict] = {"__metadata__": dict(metadata or {})}
        self._offset = 0

    def add(self, name: str, tensor: Tensor) -> None:
        if name in self._header:
            raise KeyError(f"{self.path.name}: tensor {name} written twice")
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {tensor.dtype} has no safetensors name")
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._data.write(memoryview(raw))
        end = self._offset + raw.nbytes
        self._header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self._offset, end]}
        self._offset = end

    @property
    def nbytes(self) -> int:
        return self._offset

    def close(self) -> None:
        self._data.close()
        header = json.dumps(self._header, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the format aligns the data start to 8 bytes
        with open(self.path, "wb") as out, open(self._data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)) + header)
            out.flush()
            remaining = self._offset
            while remaining:  # kernel-side copy: the bytes never come back into this process
                remaining -= os.copy_file_range(data.fileno(), out.fileno(), remaining)
            out.flush()
            os.fsync(out.fileno())
        self._data_path.unlink()
