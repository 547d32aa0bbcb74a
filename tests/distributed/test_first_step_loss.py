"""Converted checkpoint + data pipeline + trainer: with ``--lr 0`` the loss logged at iteration 1 equals
transformers' loss on the same rows.

A random tiny fp32 ``Qwen2_5OmniThinkerForConditionalGeneration`` is saved in Hugging Face format, converted
with ``mm-convert hf_to_mm`` to three layouts (TP1/PP1, TP2, PP2 with text layers [1, 2]) and trained for one
step under ``torchrun`` (2 gloo processes, all runs in one launch) from ``--load``. Rows: text only, image,
audio, image + audio. transformers' thinker (loaded from the same HF directory) then runs on exactly the
micro-batches each data-parallel rank consumed (recorded by the worker), and its loss is reduced the way the
run's loss mode says: the mean over label tokens per micro-batch averaged over micro-batches and DP ranks
(default), or all token losses over all label tokens (``--calculate-per-token-loss``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_thinker_config
from tests.distributed.test_train_omni import write_omni_data
from tests.distributed.torchrun import run_torchrun
from tests.helpers import randomize_

WORKER = Path(__file__).with_name("first_step_worker.py")
RTOL = 1e-5
pytestmark = pytest.mark.distributed

ROWS = [
    {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "user", "content": "<image>What is in this image?"},
                  {"role": "assistant", "content": "A cat is playing with a ball."}], "images": ["a.png"]},
    {"messages": [{"role": "user", "content": "<audio>What did the speaker say?"},
                  {"role": "assistant", "content": "The speaker said hello."}], "audios": ["a.wav"]},
    {"messages": [{"role": "user", "content": "<image><audio>Describe the image and the audio."},
                  {"role": "assistant", "content": "A dog and a hello."}], "images": ["b.png"], "audios": ["a.wav"]},
]
# name -> (converter layout, launcher flags)
LAYOUTS = {
    "tp1": (dict(llm_pp_layers=[[3]], vit_pp_layers=[[4]], audio_pp_layers=[[3]], tp_size=1), []),
    "tp2": (dict(llm_pp_layers=[[3]], vit_pp_layers=[[4]], audio_pp_layers=[[3]], tp_size=2),
            ["--tensor-model-parallel-size", "2"]),
    "pp2": (dict(llm_pp_layers=[[1, 2]], vit_pp_layers=[[4, 0]], audio_pp_layers=[[3, 0]], tp_size=1),
            ["--pipeline-model-parallel-size", "2"]),
}
# run name -> (layout, extra flags, loss mode)
RUNS = {
    "tp1": ("tp1", [], "micro_batch_mean"),
    "tp2": ("tp2", [], "micro_batch_mean"),
    "pp2": ("pp2", [], "micro_batch_mean"),
    "tp2_per_token": ("tp2", ["--calculate-per-token-loss"], "per_token"),
    "mindspeed_model_7b_json": ("pp2", [], "micro_batch_mean"),  # its own checkpoint and data: see below
}
MINDSPEED_RUN = "mindspeed_model_7b_json"


# MindSpeed-MM's own model_7b.json states only img_context_token_id and vision_start_token_id (the released
# tokenizer's): it runs on a tiny tokenizer with the released ids, a vocabulary of the 7B's 152064, and the
# tiny thinker's sizes written over the 7B's (and fp32 for the 1e-5 comparison); every other key as shipped.
QWEN_IDS_THINKER = dict(text={"vocab_size": 152064}, image_token_index=151655, video_token_index=151656,
                        audio_token_index=151646, audio_start_token_id=151647, audio_end_token_id=151648,
                        vision_start_token_id=151652, vision_end_token_id=151653)
SIZE_KEYS = {"num_layers", "hidden_size", "ffn_hidden_size", "intermediate_size", "llm_hidden_size",
             "num_attention_heads", "num_query_groups", "window_attn_size", "fullatt_block_indexes", "input_size",
             "d_model", "output_dim", "n_window", "mrope_section", "pipeline_num_layers"}
DTYPE_KEYS = {"params_dtype": "fp32", "bf16": False, "fp16": False}


def _shrunk_mindspeed_model_json(tiny_model_json: Path, out: Path) -> Path:
    """examples/qwen2.5omni/model_7b.json with the tiny model's sizes (and fp32) written over its own."""
    import json

    shipped = json.loads((Path(__file__).resolve().parents[2] / "examples/qwen2.5omni/model_7b.json").read_text())
    tiny = json.loads(tiny_model_json.read_text())

    def shrink(node: dict, small: dict) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                shrink(value, small.get(key) or {})
            elif key in SIZE_KEYS:
                node[key] = small[key]
            elif key in DTYPE_KEYS:
                node[key] = DTYPE_KEYS[key]

    shrink(shipped, tiny)
    assert "image_token_id" not in shipped and shipped["vision_start_token_id"] == 151652  # as shipped
    out.write_text(json.dumps(shipped))
    return out


def _hf_checkpoint(path: Path, **config) -> Path:
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5OmniThinkerForConditionalGeneration(tiny_thinker_config(**config)).float()
    randomize_(model, 1, scale=0.1)  # away from a near-uniform output, so the loss depends on every input
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def first_step(tmp_path_factory):
    from converters.config import HfToMmConfig
    from mm_omni.models.qwen2_5_omni.converter import Qwen2_5_OmniConverter

    from tests.fixtures.qwen2_5_omni import QWEN_OMNI_SPECIAL_TOKENS

    d = tmp_path_factory.mktemp("first_step")
    write_omni_data(d, ROWS)
    hf_dir = _hf_checkpoint(d / "hf")
    for name, (pc, _) in LAYOUTS.items():
        Qwen2_5_OmniConverter.hf_to_mm(HfToMmConfig(mm_dir=d / name, hf_config={"hf_dir": hf_dir},
                                                    parallel_config=pc))
    qd = d / "qwen_ids"
    qd.mkdir()
    write_omni_data(qd, ROWS, special_tokens=QWEN_OMNI_SPECIAL_TOKENS)
    q_hf = _hf_checkpoint(qd / "hf", **QWEN_IDS_THINKER)
    Qwen2_5_OmniConverter.hf_to_mm(HfToMmConfig(mm_dir=qd / "mm", hf_config={"hf_dir": q_hf},
                                                parallel_config=LAYOUTS["pp2"][0]))
    mindspeed_json = _shrunk_mindspeed_model_json(qd / "mm" / "model.json", qd / "model_7b_shrunk.json")
    common = ["--seq-length", "512", "--train-iters", "1", "--lr", "0",
              "--micro-batch-size", "2", "--global-batch-size", "4", "--log-interval", "1", "--num-workers", "0",
              "--no-load-optim", "--no-load-rng"]
    args = []
    for run, (layout, extra, _) in RUNS.items():
        if run == MINDSPEED_RUN:
            args += ["--next", run, "--mm-model", str(mindspeed_json), "--mm-data", str(qd / "data.json"),
                     "--load", str(qd / "mm"), *common, *LAYOUTS[layout][1], *extra]
            continue
        mm = d / layout
        args += ["--next"] * bool(args) + [run, "--mm-model", str(mm / "model.json"), "--mm-data",
                                           str(d / "data.json"), "--load", str(mm), *common,
                                           *LAYOUTS[layout][1], *extra]
    out = d / "out"
    out.mkdir()
    stdout = run_torchrun(WORKER, 2, str(out), *args)
    records = {run: [torch.load(out / f"{run}.rank{r}.pt", weights_only=False) for r in range(2)] for run in RUNS}
    for run, recs in records.items():
        for r in recs:
            assert "error" not in r, f"{run}: {r.get('error')}"
    return {run: qd / "hf" if run == MINDSPEED_RUN else hf_dir for run in RUNS}, records, stdout


def _hf_losses(model, batch, blank_media: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' thinker on a collated micro-batch: (sum of label-token losses, number of label tokens).
    ``blank_media`` zeroes pixels and audio features (a check that the comparison sees the encoders)."""
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "input_features", "feature_attention_mask")
    inputs = {k: batch[k] for k in keys if k in batch}
    if blank_media:
        inputs.update({k: torch.zeros_like(inputs[k]) for k in ("pixel_values", "input_features") if k in inputs})
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    labels = batch["labels"][:, 1:]
    valid = labels != -100
    tok = torch.nn.functional.cross_entropy(logits[:, :-1][valid], labels[valid], reduction="sum")
    return tok.double(), valid.sum().double()


def _reference(model, recs: list, mode: str, blank_media: bool = False) -> float:
    """transformers' loss reduced like the run: per (DP rank, micro-batch) means averaged, or per token."""
    batches = [b for r in recs if r["tp"] == 0 and r["pp"] == 0 for b in r["batches"]]
    assert len(batches) == 2, f"expected 2 micro-batches of 2 rows (global batch 4), got {len(batches)}"
    sums = [_hf_losses(model, b, blank_media) for b in batches]
    if mode == "per_token":
        return float(sum(s for s, _ in sums) / sum(n for _, n in sums))
    return float(sum(s / n for s, n in sums) / len(sums))


def test_lr0_first_step_loss_equals_transformers(first_step):
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration

    hf_dirs, records, stdout = first_step
    assert " iteration        1/       1 |" in stdout and "lm loss:" in stdout
    models = {path: Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
              for path in set(hf_dirs.values())}
    seen_rows = set()
    for run, (_, _, mode) in RUNS.items():
        recs, model = records[run], models[hf_dirs[run]]
        got = [r["losses"][1] for r in recs if 1 in r["losses"]]
        assert got, f"{run}: no rank reported the loss of iteration 1"
        ref = _reference(model, recs, mode)
        rel = abs(got[-1] - ref) / abs(ref)
        print(f"{run}: iteration-1 loss {got[-1]:.8f}, transformers {ref:.8f}, rel {rel:.2e}")
        assert rel < RTOL, f"{run}: logged {got[-1]} vs transformers {ref} (rel {rel:.2e})"
        blind = _reference(model, recs, mode, blank_media=True)
        assert abs(blind - ref) / abs(ref) > 100 * RTOL, f"{run}: the loss hardly depends on the media ({blind})"
        for r in recs:
            for b in r["batches"]:
                seen_rows.update(tuple(row[m.bool()].tolist()) for row, m in zip(b["input_ids"], b["attention_mask"]))
    assert len(seen_rows) == 2 * len(ROWS), "every row (text, image, audio, image + audio) went through a run"
