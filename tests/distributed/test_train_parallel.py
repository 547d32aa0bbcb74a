"""The training loop under torchrun (gloo, CPU): layouts agree, resume reproduces, frozen stays frozen.

One 1-process launch (the TP1 reference) and one 2-process launch that runs all 2-rank
configurations back to back (process start-up dominates on 2 shared cores).

Tolerance for "same loss curve": relative 1e-5 on losses and grad norms over 6 fp32 steps. The
layouts compute the same math in different summation orders (TP all-reduces partial matmuls,
DP averages gradients across ranks, PP accumulates micro-batches per stage), each ~1e-7 relative;
Adam divides by sqrt(v), so these do not grow much in 6 steps at lr 1e-3 (measured: <= 1e-7).
A real bug (a wrong loss scale, a lost micro-batch, a gradient not reduced) moves the loss by
>= 1e-3. Resume must reproduce the uninterrupted run bit for bit (same layout, same ops).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.torchrun import run_torchrun

WORKER = Path(__file__).with_name("train_worker.py")
ITERS = 6
COMMON = ["--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "1", "--lr-decay-style", "cosine",
          "--train-iters", str(ITERS), "--global-batch-size", "4", "--micro-batch-size", "1",
          "--log-interval", "1", "--weight-decay", "0.01", "--clip-grad", "1.0", "--seed", "42"]
RTOL = 1e-5

pytestmark = pytest.mark.distributed


def _runs(*runs):
    args = []
    for i, (name, freeze, flags) in enumerate(runs):
        args += (["--next"] if i else []) + [name, freeze, *flags]
    return args


def _read(out: Path, name: str, ranks: int) -> list[dict]:
    recs = [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(ranks)]
    for rec in recs:
        assert "error" not in rec, f"{name} rank {rec['rank']}: {rec['error']}"
    return recs


def _curve(recs: list[dict]) -> tuple[list[float], list[float]]:
    last = [r for r in recs if r["losses"]][-1]  # the last pipeline stage reports
    its = sorted(last["losses"], key=int)
    return [last["losses"][i] for i in its], [last["grad_norms"][i] for i in its]


def _close(a, b, what):
    assert len(a) == len(b), what
    print(f"{what}: max rel diff {max(abs(x - y) / abs(y) for x, y in zip(a, b)):.2e}")  # shown with -s
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= RTOL * abs(y), f"{what}: step {i + 1}: {x} vs {y} (rel {abs(x - y) / abs(y):.2e})"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    ckpt = out / "ckpt"
    run_torchrun(WORKER, 1, str(out), *_runs(("tp1", "-", COMMON)))
    stop = ["--use-distributed-optimizer", "--save", str(ckpt), "--save-interval", "3"]
    frozen = "embedding,decoder.layers.0,decoder.layers.1,decoder.layers.3.mlp"
    run_torchrun(WORKER, 2, str(out), *_runs(
        ("tp2", "-", COMMON + ["--tensor-model-parallel-size", "2"]),
        ("tp2sp", "-", COMMON + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
        ("cp2", "-", COMMON + ["--context-parallel-size", "2"]),
        ("dp2", "-", COMMON + ["--use-distributed-optimizer"]),
        ("pp2", "-", COMMON + ["--pipeline-model-parallel-size", "2"]),
        ("vpp", "-", COMMON + ["--pipeline-model-parallel-size", "2", "--num-layers", "4",
                               "--num-layers-per-virtual-pipeline-stage", "1"]),
        ("stopped", "-", COMMON + stop + ["--exit-interval", "3"]),
        ("resumed", "-", COMMON + stop + ["--load", str(ckpt)]),
        ("frozen", frozen, COMMON + ["--pipeline-model-parallel-size", "2", "--enable-dummy-optimizer"]),
    ))
    return out


@pytest.mark.parametrize("layout,ranks", [("tp2", 2), ("tp2sp", 2), ("cp2", 2), ("dp2", 2), ("pp2", 2), ("vpp", 2)])
def test_layouts_match_tp1(results, layout, ranks):
    ref_loss, ref_norm = _curve(_read(results, "tp1", 1))
    loss, norm = _curve(_read(results, layout, ranks))
    assert len(ref_loss) == ITERS and ref_loss[-1] < ref_loss[0]  # it learns
    _close(loss, ref_loss, f"{layout} loss")
    _close(norm, ref_norm, f"{layout} grad norm")


def test_resume_reproduces_uninterrupted_run(results):
    full, _ = _curve(_read(results, "dp2", 2))  # same layout (DP2 + distributed optimizer), never stopped
    stopped, _ = _curve(_read(results, "stopped", 2))
    resumed_recs = _read(results, "resumed", 2)
    resumed, _ = _curve(resumed_recs)
    assert len(stopped) == 3 and len(resumed) == ITERS - 3
    assert stopped == full[:3]
    assert resumed == full[3:], (resumed, full[3:])  # bit for bit
    assert resumed_recs[0]["consumed"] == ITERS * 4
    assert (results / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == str(ITERS)
    assert (results / "ckpt" / "iter_0000003" / "mp_rank_00" / "distrib_optim.pt").is_file()


def test_frozen_params_unchanged_and_dummy_optimizer(results):
    recs = _read(results, "frozen", 2)
    stage0, stage1 = recs
    assert stage0["frozen_before"] and stage0["frozen_before"] == stage0["frozen_after"]  # all of stage 0
    assert stage1["frozen_before"] and stage1["frozen_before"] == stage1["frozen_after"]
    assert all(".mlp." in k for k in stage1["frozen_before"])
    loss, _ = _curve(recs)
    assert len(loss) == ITERS and loss[-1] != loss[0]  # the rest still trains
