"""The README's first command, minus the environment setup: ``examples/qwen2.5omni/demo.py`` end to end (tiny
random Qwen2.5-Omni with talker/token2wav -> mm-convert hf_to_mm TP2/PP2 -> torchrun x4 fine-tune -> mm_to_hf ->
transformers). ~45 s on 2 idle CPU cores (under a minute, so in the fast suite); the demo fails on any check."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "examples" / "qwen2.5omni" / "demo.py"
pytestmark = pytest.mark.distributed


def test_demo_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("MM_OMNI_DEVICE", "cpu")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the demo sets it; restored after the test
    spec = importlib.util.spec_from_file_location("mm_omni_demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    res = demo.main(["--workdir", str(tmp_path / "demo")])
    print(f"demo: loss {res['first_loss']:.4f} -> {res['last_loss']:.4f}, wall {res['wall_s']:.0f}s")
    assert res["last_loss"] < 0.5 * res["first_loss"]
    assert res["loss_after"] < res["loss_before"]
