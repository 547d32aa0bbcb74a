"""The Qwen3-MoE text decoder at expert-parallel size 2 (4 of 8 experts per rank), and at tensor-parallel size 2
with sequence parallelism (every expert split over TP), equals one process."""

from pathlib import Path

import pytest

from tests.distributed.torchrun import run_torchrun


@pytest.mark.distributed
def test_text_moe_ep2_and_tp2_match_one_process():
    out = run_torchrun(Path(__file__).with_name("text_moe_ep_worker.py"), 2, timeout=300)
    assert "TEXT_MOE_EP_OK" in out and "TEXT_MOE_TP_OK" in out, out
