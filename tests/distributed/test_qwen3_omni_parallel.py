"""The Qwen3-Omni thinker at PP=2 (the deepstack additions of layers 1 and 2 sent across the stage boundary) and
at TP=2 with sequence parallelism equals one process: losses, logits and every parameter gradient."""

from pathlib import Path

import pytest

from tests.distributed.torchrun import run_torchrun


@pytest.mark.distributed
def test_qwen3_omni_pp2_and_tp2_sp_match_one_process():
    out = run_torchrun(Path(__file__).with_name("qwen3_omni_parallel_worker.py"), 2, timeout=300)
    assert "QWEN3_OMNI_PP_OK" in out and "QWEN3_OMNI_TP_SP_OK" in out, out
