"""``--profile --use-pytorch-profiler``: the window's trace is written and its op table logged (one process)."""

from __future__ import annotations

import json

import pytest

from mm_omni.config.arguments import ArgumentsError, parse_args, validate_args
from mm_omni.train import main
from tests.distributed.standin_task import standin_task
from tests.distributed.torchrun import free_port

FLAGS = ["--lr", "1e-3", "--train-iters", "4", "--global-batch-size", "2", "--log-interval", "1",
         "--lr-decay-style", "constant"]


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                     LOCAL_RANK="0").items():
        monkeypatch.setenv(k, v)


def test_profile_window_writes_trace_and_table(tmp_path, capfd):
    main(FLAGS + ["--profile", "--use-pytorch-profiler", "--profile-step-start", "2", "--profile-step-end", "4",
                  "--profile-dir", str(tmp_path)], task_factory=lambda args, cfg: standin_task(args))
    traces = list(tmp_path.glob("trace_rank0_iters2-3.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any("aten::mm" in e.get("name", "") or "aten::addmm" in e.get("name", "") for e in events)
    log = "".join(capfd.readouterr())
    assert "profile of iterations 2-3" in log and "Self CPU" in log


def test_profile_window_must_be_ordered():
    args = parse_args(FLAGS + ["--profile", "--profile-step-start", "3", "--profile-step-end", "3"])
    with pytest.raises(ArgumentsError, match="--profile-step-start --profile-step-end=3 3"):
        validate_args(args, world_size=1)
