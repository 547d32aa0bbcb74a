"""The Qwen3 vision encoder at TP=2 (heads, MLPs and every merger split) equals TP=1 (torchrun, gloo)."""

from pathlib import Path

import pytest

from tests.distributed.torchrun import run_torchrun


@pytest.mark.distributed
def test_qwen3_vision_encoder_tp2_matches_tp1():
    out = run_torchrun(Path(__file__).with_name("vision_qwen3_tp_worker.py"), 2, timeout=300)
    assert "VISION_QWEN3_TP_OK" in out, out
