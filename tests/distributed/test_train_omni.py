"""``mm_omni.train --mm-model model.json --mm-data data.json`` on the tiny omni model: TP=2, DP=2
(+ distributed optimizer), CP=2 and PP=2 (text layers [1, 2], encoders on stage 0) follow the TP=1 loss curve over 3 steps (rel 1e-5, as for the stand-in:
same math, different summation orders). Rows: text only, image, audio, image + audio."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pytest

from tests.conftest import tiny_thinker_config
from tests.distributed.torchrun import run_torchrun

WORKER = Path(__file__).with_name("omni_train_worker.py")
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


def write_omni_data(d: Path, rows: list, special_tokens: Optional[dict] = None) -> Path:
    """``d/data.json`` over ``rows`` with the media they name (a.png, b.png, a.wav) and the tiny processor
    (its special tokens at ``special_tokens``' ids when given)."""
    from tests.fixtures.qwen2_5_omni import build_tiny_processor, tiny_data_config
    from tests.fixtures.media import write_dataset, write_image, write_wav

    media = d / "media"
    media.mkdir()
    write_image(media / "a.png", 56, 56, seed=0)
    write_image(media / "b.png", 84, 56, seed=1)
    write_wav(media / "a.wav", seconds=1.0)
    build_tiny_processor(d / "processor", **({"special_tokens": special_tokens} if special_tokens else {}))
    data = tiny_data_config(d / "processor", media, write_dataset(d / "rows.json", rows))
    (d / "data.json").write_text(json.dumps(data))
    return d / "data.json"


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config

    d = tmp_path_factory.mktemp("omni_train")
    write_omni_data(d, ROWS * 3)
    model = from_hf_thinker_config(tiny_thinker_config())
    model.text_decoder.pipeline_num_layers = [1, 2]  # PP=2: MindSpeed-MM's uneven split (used by the PP run)
    (d / "model.json").write_text(model.model_dump_json())
    common = ["--mm-model", str(d / "model.json"), "--mm-data", str(d / "data.json"), "--seq-length", "512",
              "--train-iters", "3", "--lr", "1e-3", "--lr-decay-style", "constant", "--micro-batch-size", "2",
              "--global-batch-size", "4", "--log-interval", "1", "--log-tps", "--num-workers", "0",
              "--use-flash-attn", "--use-fused-rmsnorm"]

    def run(name, nproc, *flags):
        stdout = run_torchrun(WORKER, nproc, str(d / name), str(d / "init.pt"), *common, *flags)
        recs = [json.loads(Path(f"{d / name}.rank{r}").read_text()) for r in range(nproc)]
        return stdout, [r for r in recs if r["losses"]][-1]

    return run


def _close(got: dict, ref: dict, what: str):
    assert got.keys() == ref.keys(), what
    worst = max(abs(got[k] - ref[k]) / abs(ref[k]) for k in ref)
    print(f"{what}: max rel diff {worst:.2e}")  # shown with -s: the measured agreement
    assert worst <= RTOL, f"{what}: {got} vs {ref}"


def test_omni_tp2_and_dp2_follow_tp1(launch):
    stdout, ref = launch("tp1", 1)
    assert "tokens per sec per device" in stdout and "--use-flash-attn accepted" in stdout
    _, tp2 = launch("tp2", 2, "--tensor-model-parallel-size", "2")
    _, dp2 = launch("dp2", 2, "--use-distributed-optimizer")
    _, pp2 = launch("pp2", 2, "--pipeline-model-parallel-size", "2")
    # CP=2: media features scattered into the full embeddings, then each rank keeps its zig-zag half
    _, cp2 = launch("cp2", 2, "--context-parallel-size", "2")
    for name, rec in (("tp2", tp2), ("dp2", dp2), ("pp2", pp2), ("cp2", cp2)):
        _close(rec["losses"], ref["losses"], f"{name} loss")
        _close(rec["grad_norms"], ref["grad_norms"], f"{name} grad norm")
