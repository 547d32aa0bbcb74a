"""The text decoder with TP=2 + sequence parallel, and with CP=2 (zig-zag split, K/V all-gathered),
equals the single-process decoder: logits, loss and gradients, padded and packed rows (rel < 1e-5, fp32)."""

from pathlib import Path

import pytest

from tests.distributed.torchrun import run_torchrun


@pytest.mark.distributed
def test_text_decoder_sequence_and_context_parallel_match_single():
    out = run_torchrun(Path(__file__).with_name("text_sp_cp_worker.py"), 2, timeout=300)
    assert "TEXT_SP_CP_OK" in out, out
