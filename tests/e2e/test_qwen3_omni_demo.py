"""examples/qwen3omni/demo.py end to end on the CPU: a tiny random Qwen3-Omni converted to PP2 x EP2, fine-tuned by
4 torchrun processes (the deepstack additions cross the pipeline stages, the experts split over EP), exported and
loaded by transformers with its talker and code2wav bit-identical."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_qwen3_omni_demo(tmp_path):
    spec = importlib.util.spec_from_file_location("qwen3_demo", REPO / "examples" / "qwen3omni" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    res = demo.main(["--workdir", str(tmp_path / "demo"), "--train-iters", "12"])
    assert res["last_loss"] < 0.7 * res["first_loss"]
    assert res["balance"] and all(b > 0 for b in res["balance"])  # the load-balancing loss is logged
    assert 0 < res["changed"] < res["total"]
