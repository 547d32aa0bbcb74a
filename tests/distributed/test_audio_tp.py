"""The audio encoder at TP=2 (4 heads split 2/2) equals TP=1: forward and gradients (torchrun, gloo)."""

from pathlib import Path

import pytest

from tests.distributed.torchrun import run_torchrun


@pytest.mark.distributed
def test_audio_encoder_tp2_matches_tp1():
    out = run_torchrun(Path(__file__).with_name("audio_tp_worker.py"), 2, timeout=300)
    assert "AUDIO_TP_OK" in out, out
