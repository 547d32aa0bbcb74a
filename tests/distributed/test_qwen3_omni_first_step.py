"""Qwen3-Omni through the converter, the data pipeline and the trainer: with ``--lr 0`` the loss logged at
iteration 1 equals transformers' thinker's loss on the same rows.

A tiny random fp32 ``Qwen3OmniMoeForConditionalGeneration`` (the demo's: MoE thinker with deepstack vision and
AuT audio, talker, code2wav; thinker weights perturbed so the loss depends on every input) and its tiny
processor are saved in Hugging Face format; ms-swift jsonl rows (text, image, audio, image + audio) go through
data.json with the ``qwen3_omni`` template (unpacked, so transformers can take the same padded micro-batches);
``mm-convert Qwen3_OmniConverter hf_to_mm`` writes EP 1 and EP 2 layouts; ``mm_omni.train`` runs one step under
``torchrun`` (2 gloo processes: DP 2, and EP 2 with the experts split) from ``--load``. transformers' thinker,
loaded from the HF directory, computes its own positions (``get_rope_index``: float M-RoPE, audio and vision
markers) on exactly the micro-batches each rank consumed; the mean over label tokens per micro-batch averaged
over micro-batches is the run's LM loss (the load-balancing loss is logged apart).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.distributed.test_first_step_loss import _reference
from tests.distributed.torchrun import run_torchrun
from tests.helpers import randomize_

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("first_step_worker.py")
RTOL = 1e-5
pytestmark = pytest.mark.distributed
RUNS = {"dp2": ([[3]], 1, []), "ep2": ([[3]], 2, ["--expert-model-parallel-size", "2"])}


def _demo():
    spec = importlib.util.spec_from_file_location("qwen3_demo_tools", REPO / "examples" / "qwen3omni" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


@pytest.fixture(scope="module")
def first_step(tmp_path_factory):
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeForConditionalGeneration

    from converters.config import HfToMmConfig
    from mm_omni.registry import by_name

    demo, d = _demo(), tmp_path_factory.mktemp("qwen3_first_step")
    hf = d / "hf"
    demo.build_hf_model(hf)
    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(hf, dtype=torch.float32)
    randomize_(model.thinker, 1, scale=0.1)  # away from a near-uniform output
    model.save_pretrained(hf)
    data_json = demo.build_data(d, hf)
    data = json.loads(data_json.read_text())
    data["dataloader_param"]["packing"] = False
    data_json.write_text(json.dumps(data))
    converter = by_name("qwen3_omni_moe").load("converter")
    args = []
    for run, (llm, ep, flags) in RUNS.items():
        mm = d / run
        converter.hf_to_mm(HfToMmConfig(mm_dir=mm, hf_config={"hf_dir": hf}, parallel_config=dict(
            llm_pp_layers=llm, vit_pp_layers=[[4]], audio_pp_layers=[[2]], ep_size=ep)))
        args += ["--next"] * bool(args) + [run, "--mm-model", str(mm / "model.json"), "--mm-data", str(data_json),
                                           "--load", str(mm), "--seq-length", "1024", "--train-iters", "1",
                                           "--lr", "0", "--micro-batch-size", "2", "--global-batch-size", "4",
                                           "--log-interval", "1", "--num-workers", "0", "--no-load-optim",
                                           "--no-load-rng", *flags]
    out = d / "out"
    out.mkdir()
    stdout = run_torchrun(WORKER, 2, str(out), *args)
    records = {run: [torch.load(out / f"{run}.rank{r}.pt", weights_only=False) for r in range(2)] for run in RUNS}
    for run, recs in records.items():
        for r in recs:
            assert "error" not in r, f"{run}: {r.get('error')}"
    return hf, records, stdout


def test_lr0_first_step_loss_equals_transformers(first_step):
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeForConditionalGeneration

    hf, records, stdout = first_step
    assert "load_balancing_loss:" in stdout
    thinker = Qwen3OmniMoeForConditionalGeneration.from_pretrained(hf, dtype=torch.float32).thinker.eval()
    seen = set()
    for run, recs in records.items():
        got = [r["losses"][1] for r in recs if 1 in r["losses"]]
        assert got, f"{run}: no rank reported the loss of iteration 1"
        ref = _reference(thinker, recs, "micro_batch_mean")
        rel = abs(got[-1] - ref) / abs(ref)
        print(f"{run}: iteration-1 loss {got[-1]:.8f}, transformers {ref:.8f}, rel {rel:.2e}")
        assert rel < RTOL, f"{run}: logged {got[-1]} vs transformers {ref} (rel {rel:.2e})"
        blind = _reference(thinker, recs, "micro_batch_mean", blank_media=True)
        assert abs(blind - ref) / abs(ref) > 100 * RTOL, f"{run}: the loss hardly depends on the media ({blind})"
        for r in recs:
            for b in r["batches"]:
                seen.update(tuple(row[m.bool()].tolist()) for row, m in zip(b["input_ids"], b["attention_mask"]))
    assert len(seen) == 4, "every row (text, image, audio, image + audio) went through the runs"
