"""The vision encoder at TP=2 (2 heads split 1/1, SwiGLU and merger MLP split) equals TP=1 (torchrun, gloo)."""

from pathlib import Path

import pytest

from tests.distributed.torchrun import run_torchrun


@pytest.mark.distributed
def test_vision_encoder_tp2_matches_tp1():
    out = run_torchrun(Path(__file__).with_name("vision_tp_worker.py"), 2, timeout=300)
    assert "VISION_TP_OK" in out, out
