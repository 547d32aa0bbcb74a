"""The whole thinker at TP=2 (vision, audio and text stacks split 2/2) equals TP=1: logits, loss, gradients."""

from pathlib import Path

import pytest

from tests.distributed.torchrun import run_torchrun


@pytest.mark.distributed
def test_thinker_tp2_matches_tp1():
    out = run_torchrun(Path(__file__).with_name("thinker_tp_worker.py"), 2, timeout=300)
    assert "THINKER_TP_OK" in out, out
