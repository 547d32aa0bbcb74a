"""The text decoder at TP=2 (vocab, query groups and SwiGLU split 2/2) equals TP=1: padded and packed batches."""

from pathlib import Path

import pytest

from tests.distributed.torchrun import run_torchrun


@pytest.mark.distributed
def test_text_decoder_tp2_matches_tp1():
    out = run_torchrun(Path(__file__).with_name("text_tp_worker.py"), 2, timeout=300)
    assert "TEXT_TP_OK" in out, out
