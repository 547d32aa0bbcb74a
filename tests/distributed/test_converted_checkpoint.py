"""mm-convert's TP=2 and PP=2 checkpoints, loaded rank by rank under torchrun, give transformers' logits."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.torchrun import run_torchrun
from tests.unit.converters.conftest import make_hf_checkpoint
from tests.unit.converters.helpers import hf_to_mm, layout

WORKER = Path(__file__).with_name("converted_ckpt_worker.py")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("hf") / "tiny", perturb=0.05)


@pytest.mark.parametrize("mode,pc", [
    ("tp2", layout([[3]], [[4]], [[3]], tp=2)),
    ("pp2", layout([[1, 2]], [[4, 0]], [[3, 0]])),
])
def test_converted_checkpoint_gives_transformers_logits(tmp_path, hf_dir, mode, pc):
    mm_dir = hf_to_mm(hf_dir, tmp_path / "mm", pc)
    out = run_torchrun(WORKER, 2, str(mm_dir), str(hf_dir), mode, timeout=300)
    assert f"CONVERTED_{mode.upper()}_OK" in out, out
