"""``mm_omni.train`` on a tiny omni model with a mixture-of-experts text decoder (4 experts, top-2, q/k norms, a
dense layer between two MoE layers, load-balancing loss on): expert parallelism 2 over 2 processes (2 experts
per rank, the dense part data-parallel 2) follows 1 process with the same global batch (4 micro-batches of 1
there, 2 per rank here: gradient accumulation), with megatron's optimizer and its distributed one, in the
default loss mode and with ``--calculate-per-token-loss``: losses, grad norms and the logged load-balancing
loss agree to rel 1e-5 (same math, other summation orders, as for the dense layouts). A wrong scale of the
load-balancing gradient (its coefficient is large here) or an expert gradient reduced like a dense one moves
the grad norm far more. A run saved at EP 2 and resumed gives the uninterrupted run's next losses bit for bit,
from one rank directory per EP rank (``mp_rank_00_000_00E``) holding its experts numbered locally. LoRA on
attention, the dense MLP and every expert, and every layer recomputed in the backward (the router's
load-balancing loss counted once): EP 2 follows 1 process as well.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import tiny_thinker_config
from tests.distributed.test_train_omni import ROWS, write_omni_data
from tests.distributed.torchrun import run_torchrun

WORKER = Path(__file__).with_name("moe_train_worker.py")
RTOL = 1e-5
ITERS = 4
pytestmark = pytest.mark.distributed


def moe_model_json(path: Path) -> Path:
    """The tiny Qwen2.5-Omni thinker's model.json with a Qwen3-MoE-style text decoder."""
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config

    model = from_hf_thinker_config(tiny_thinker_config())
    data = json.loads(model.model_dump_json())
    data["text_decoder"].update(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_layer_freq=[1, 0, 1],
                                moe_aux_loss_coeff=0.1, qk_layernorm=True, add_qkv_bias=False,
                                moe_token_dispatcher_type="alltoall")
    path.write_text(json.dumps(data))
    return path


def _runs(*runs) -> list[str]:
    args = []
    for i, (name, flags) in enumerate(runs):
        args += (["--next"] if i else []) + [name, *flags]
    return args


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe_train")
    text_rows = [r for r in ROWS if "images" not in r and "audios" not in r]
    more = [{"messages": [{"role": "user", "content": f"Count to {n}."},
                          {"role": "assistant", "content": " ".join(str(i) for i in range(1, n + 1))}]}
            for n in range(2, 9)]
    write_omni_data(d, (text_rows + more) * 3)
    common = ["--mm-model", str(moe_model_json(d / "model.json")), "--mm-data", str(d / "data.json"),
              "--seq-length", "256", "--train-iters", str(ITERS), "--lr", "1e-3", "--lr-decay-style", "constant",
              "--micro-batch-size", "1", "--global-batch-size", "4", "--log-interval", "1", "--num-workers", "0",
              "--clip-grad", "1.0", "--seed", "7"]
    ep2 = ["--expert-model-parallel-size", "2"]
    tok = ["--calculate-per-token-loss"]
    # adapters on attention, the dense MLP and every expert (one per expert linear); only they train
    lora = ["--lora-target-modules", "linear_qkv", "linear_fc1", "linear_fc2", "--lora-r", "4", "--lora-alpha", "8",
            "--lr", "1e-2"]
    ckpt, ckpt_do = d / "ckpt", d / "ckpt_do"
    stop = ["--save-interval", "2", "--exit-interval", "2"]
    init = str(d / "init.pt")
    out1 = run_torchrun(WORKER, 1, str(d), init, *_runs(("ref", common), ("ref_tok", common + tok),
                                                          ("ref_lora", common + lora)), timeout=900)
    out2 = run_torchrun(WORKER, 2, str(d), init, *_runs(
        ("ep2", common + ep2),
        ("ep2_tok", common + ep2 + tok),
        ("ep2_do", common + ep2 + ["--use-distributed-optimizer"]),
        ("ep2_recompute", common + ep2 + ["--recompute-granularity", "full", "--recompute-method", "uniform",
                                          "--recompute-num-layers", "1"]),
        ("ep2_lora", common + ep2 + lora + ["--save", str(d / "ckpt_lora"), "--save-interval", str(ITERS)]),
        ("stopped", common + ep2 + ["--save", str(ckpt)] + stop),
        ("resumed", common + ep2 + ["--save", str(ckpt), "--load", str(ckpt)]),
        ("stopped_do", common + ep2 + ["--use-distributed-optimizer", "--save", str(ckpt_do)] + stop),
        ("resumed_do", common + ep2 + ["--use-distributed-optimizer", "--save", str(ckpt_do), "--load", str(ckpt_do)]),
    ), timeout=900)
    return d, out1 + out2


def _read(d: Path, name: str, ranks: int) -> list[dict]:
    recs = [json.loads((d / f"{name}.rank{r}.json").read_text()) for r in range(ranks)]
    for rec in recs:
        assert "error" not in rec, f"{name} rank {rec['rank']}: {rec['error']}"
    return recs


def _curves(recs: list[dict]) -> tuple[list, list, list]:
    last = [r for r in recs if r["losses"]][-1]
    its = sorted(last["losses"], key=int)
    return ([last["losses"][i] for i in its], [last["grad_norms"][i] for i in its], [last["balance"][i] for i in its])


def _close(a: list, b: list, what: str) -> None:
    assert len(a) == len(b) == ITERS, what
    worst = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    print(f"{what}: max rel diff {worst:.2e}")  # shown with -s: the measured agreement
    assert worst <= RTOL, f"{what}: {a} vs {b}"


@pytest.mark.parametrize("ref,run", [("ref", "ep2"), ("ref_tok", "ep2_tok"), ("ref", "ep2_do"),
                                     ("ref", "ep2_recompute")])
def test_ep2_follows_one_process(results, ref, run):
    d, _ = results
    ref_recs, recs = _read(d, ref, 1), _read(d, run, 2)
    want, got = _curves(ref_recs), _curves(recs)
    assert want[0][-1] < want[0][0] and all(b > 0 for b in want[2])  # it learns; the balance loss is there
    for what, a, b in zip(("loss", "grad norm", "load-balancing loss"), got, want):
        _close(a, b, f"{run} {what}")
    assert ref_recs[0]["built"] == {"ep": 1, "etp": 1, "capacity_factor": None,
                                    "experts": [f".local_experts.{i}." for i in range(4)]}
    for rec in recs:  # two experts per rank, numbered locally; no token dropping
        assert rec["built"] == {"ep": 2, "etp": 1, "capacity_factor": None,
                                "experts": [".local_experts.0.", ".local_experts.1."]}


def test_ep2_lora_on_experts_follows_one_process(results):
    """An expert's adapter is reduced over the expert-data-parallel group like the expert's weight (reduced
    over all data-parallel ranks it would be averaged with another expert's) and starts from the same ``A``
    (seeded by the global expert number) at EP 1 and EP 2; the save holds each EP rank's expert adapters."""
    d, _ = results
    want, got = _curves(_read(d, "ref_lora", 1)), _curves(_read(d, "ep2_lora", 2))
    assert want[0][-1] < want[0][0]
    for what, a, b in zip(("loss", "grad norm", "load-balancing loss"), got, want):
        _close(a, b, f"ep2_lora {what}")
    import torch

    step = d / "ckpt_lora" / f"iter_{ITERS:07d}"
    for ep in range(2):
        state = torch.load(step / f"mp_rank_00_000_{ep:03d}" / "model_optim_rng.pt", weights_only=False)["model"]
        assert state and all(".lora_" in k for k in state if not k.endswith("._extra_state")), sorted(state)[:4]
        experts = {m.group(1) for k in state for m in [re.search(r"\.local_experts\.(\d+)\.linear_fc1\.lora_B", k)]
                   if m}
        assert experts == {"0", "1"}, experts


def test_load_balancing_loss_logged_next_to_lm_loss(results):
    d, stdout = results
    lines = [ln for ln in stdout.splitlines() if " iteration " in ln and "lm loss:" in ln]
    assert lines and all(re.search(r"lm loss: \S+ \| load_balancing_loss: \S+ \|", ln) for ln in lines), lines[:3]
    assert "EP 2, DP 2" in stdout


@pytest.mark.parametrize("full,stopped,resumed,ckpt", [("ep2", "stopped", "resumed", "ckpt"),
                                                       ("ep2_do", "stopped_do", "resumed_do", "ckpt_do")])
def test_ep2_resume_reproduces_uninterrupted_run(results, full, stopped, resumed, ckpt):
    d, _ = results
    whole, first, rest = (_curves(_read(d, n, 2)) for n in (full, stopped, resumed))
    assert len(first[0]) == 2 and len(rest[0]) == ITERS - 2
    assert first[0] == whole[0][:2]
    assert rest == tuple(c[2:] for c in whole), (rest, whole)  # losses, grad norms, balance: bit for bit
    step = d / ckpt / "iter_0000002"
    assert sorted(p.name for p in step.iterdir()) == ["mp_rank_00_000_000", "mp_rank_00_000_001"]
    import torch

    for ep in range(2):
        state = torch.load(step / f"mp_rank_00_000_{ep:03d}" / "model_optim_rng.pt", weights_only=False)
        experts = {m.group(1) for k in state["model"] for m in [re.search(r"\.local_experts\.(\d+)\.", k)] if m}
        assert experts == {"0", "1"}, experts
        if full == "ep2_do":
            assert (step / f"mp_rank_00_000_{ep:03d}" / "distrib_optim.pt").is_file()
