"""The chunked fused loss at TP=2 (vocab split, with and without sequence parallelism) equals the full-logits path."""

from pathlib import Path

import pytest

from tests.distributed.torchrun import run_torchrun


@pytest.mark.distributed
def test_fused_loss_tp2_matches_full_logits():
    out = run_torchrun(Path(__file__).with_name("fused_loss_tp_worker.py"), 2, timeout=300)
    assert "FUSED_LOSS_TP_OK" in out, out
