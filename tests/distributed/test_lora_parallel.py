"""LoRA under torchrun (gloo, CPU): TP=2 (with and without sequence parallel), DP=2 + distributed
optimizer and PP=2 follow the TP=1 LoRA loss curve (stand-in GPT, 4 steps, rel 1e-5 as in
test_train_parallel.py: same math, different summation orders).

TP=2 checks the adapter's shards and collectives: column-parallel linears (QKV, fc1) with a
replicated A and a split B, row-parallel ones (proj, fc2) with a split A and a replicated B; under
sequence parallel the replicated factor's gradient is summed over TP by finalize_model_grads.
PP=2 checks that adapters are seeded by global layer names. lora_sp_worker.py checks one
column -> row pair's outputs and every gradient against full-tensor math.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.test_train_parallel import _close, _curve, _read, _runs
from tests.distributed.torchrun import run_torchrun

WORKER = Path(__file__).with_name("train_worker.py")
ITERS = 4
COMMON = ["--lr", "1e-2", "--lr-decay-style", "constant", "--train-iters", str(ITERS), "--global-batch-size", "4",
          "--micro-batch-size", "1", "--log-interval", "1", "--clip-grad", "1.0", "--seed", "42",
          "--lora-target-modules", "linear_qkv,linear_proj,linear_fc1,linear_fc2", "--lora-r", "4",
          "--lora-alpha", "8"]

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    run_torchrun(WORKER, 1, str(out), *_runs(("tp1", "-", COMMON)))
    run_torchrun(WORKER, 2, str(out), *_runs(
        ("tp2", "-", COMMON + ["--tensor-model-parallel-size", "2"]),
        ("tp2sp", "-", COMMON + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
        ("dp2", "-", COMMON + ["--use-distributed-optimizer"]),
        ("pp2", "-", COMMON + ["--pipeline-model-parallel-size", "2"]),
    ))
    return out


@pytest.mark.parametrize("layout", ["tp2", "tp2sp", "dp2", "pp2"])
def test_lora_layouts_match_tp1(results, layout):
    ref_loss, ref_norm = _curve(_read(results, "tp1", 1))
    assert len(ref_loss) == ITERS and ref_loss[-1] < ref_loss[0]  # the adapters learn
    loss, norm = _curve(_read(results, layout, 2))
    _close(loss, ref_loss, f"lora {layout} loss")
    _close(norm, ref_norm, f"lora {layout} grad norm")


def test_lora_leaves_base_frozen(results):
    for rec in _read(results, "tp2", 2):  # every base tensor is frozen and unchanged by training
        assert rec["frozen_after"] and all(".lora_" not in k for k in rec["frozen_after"])


def test_lora_layers_tp2_with_and_without_sequence_parallel(tmp_path):
    """Column -> row LoRA pair at TP=2 (plain and sequence parallel) equals the full-tensor math."""
    run_torchrun(Path(__file__).with_name("lora_sp_worker.py"), 2, str(tmp_path), timeout=300)
    for rank in (0, 1):
        rows = [line.split() for line in (tmp_path / f"rank{rank}.txt").read_text().splitlines()]
        assert len(rows) == 12  # {tp, sp} x {out, dx, col.A, col.B, row.A, row.B}
        for mode, what, err in rows:
            assert float(err) < 1e-5, f"rank {rank} {mode} {what}: rel err {err}"
