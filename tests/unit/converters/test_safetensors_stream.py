"""The streaming safetensors writer produces files the official reader reads back exactly."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from converters.common.safetensors_stream import SafetensorsStreamWriter


def test_stream_writer_round_trips_every_dtype_and_shape(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.bf16": torch.randn(3, 5, generator=gen).bfloat16(),
        "b.f32": torch.randn(7, generator=gen),
        "c.f16": torch.randn(2, 2, 2, generator=gen).half(),
        "d.i64": torch.arange(5),
        "e.bool": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(3.5),
        "g.empty": torch.zeros(0, 4),
        "h.view": torch.randn(6, 4, generator=gen).t(),  # non-contiguous input
    }
    path = tmp_path / "model-00001-of-00001.safetensors"
    writer = SafetensorsStreamWriter(path, metadata={"format": "pt"})
    for name, t in tensors.items():
        writer.add(name, t)
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # the temp data file is gone
    back = load_file(path)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape and torch.equal(back[name], t), name
