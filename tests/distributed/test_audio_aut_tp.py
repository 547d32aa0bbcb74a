"""The AuT audio encoder at TP=2 (heads and MLP split) equals TP=1 (torchrun, gloo)."""

from pathlib import Path

import pytest

from tests.distributed.torchrun import run_torchrun


@pytest.mark.distributed
def test_aut_audio_encoder_tp2_matches_tp1():
    out = run_torchrun(Path(__file__).with_name("audio_aut_tp_worker.py"), 2, timeout=300)
    assert "AUDIO_AUT_TP_OK" in out, out
