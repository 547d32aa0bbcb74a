"""A budget-packed micro-batch (rows padded for CP, bucket padding) under CP=2 gives CP=1's loss, divisor
and gradients in every loss mode; per-sample counts rows (fp32, gloo)."""

from pathlib import Path

import pytest

from tests.distributed.torchrun import run_torchrun


@pytest.mark.distributed
def test_packed_loss_modes_under_context_parallel():
    out = run_torchrun(Path(__file__).with_name("packing_loss_cp_worker.py"), 2, timeout=300)
    assert "PACKING_LOSS_CP_OK" in out, out
