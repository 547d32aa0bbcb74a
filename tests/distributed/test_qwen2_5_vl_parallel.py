"""``mm_omni.train`` on a tiny Qwen2.5-VL (model.json without audio_encoder, template ``qwen2vl``) under torchrun
(gloo, CPU): TP=2 (vision and text stacks split) and PP=2 (text layers [1, 2], the vision encoder on stage 0)
follow the one-process run's losses and gradient norms over 3 steps at rel 1e-5 (same math, other summation
orders; a lost micro-batch or an unreduced gradient moves them by >= 1e-3). Rows: text only, an image, a video,
an image and a video; every layout starts from the weights the one-process run starts from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.torchrun import run_torchrun

WORKER = Path(__file__).with_name("omni_train_worker.py")  # one run; writes the initial weights
MULTI = Path(__file__).with_name("multi_run_train_worker.py")  # the 2-process runs in one launch
RTOL = 1e-5
pytestmark = pytest.mark.distributed

ROWS = [
    {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "user", "content": "<image>What is in this image?"},
                  {"role": "assistant", "content": "A cat is playing with a ball."}], "images": ["a.png"]},
    {"messages": [{"role": "user", "content": "<video>What is she doing?"},
                  {"role": "assistant", "content": "She is playing with a ball."}], "videos": ["v.mp4"]},
    {"messages": [{"role": "user", "content": "<image><video>Compare these two pictures."},
                  {"role": "assistant", "content": "A dog and a fox."}], "images": ["b.png"], "videos": ["v.mp4"]},
]


def write_vl_data(d: Path, rows: list, special_tokens: dict | None = None, config=None) -> Path:
    """``d/data.json`` (template qwen2vl) over ``rows`` with the media they name (a.png, b.png, v.mp4), the tiny
    processor (its special tokens at ``special_tokens``' ids when given) and ``config``'s config.json beside it."""
    from tests.fixtures.media import write_dataset, write_image, write_video
    from tests.fixtures.qwen2_5_vl import build_tiny_vl_processor, tiny_vl_data_config, write_vl_config_json

    media = d / "media"
    media.mkdir()
    write_image(media / "a.png", 56, 56, seed=0)
    write_image(media / "b.png", 84, 56, seed=1)
    write_video(media / "v.mp4", seconds=2.0, fps=4, size=56, with_audio=False)
    build_tiny_vl_processor(d / "processor", **({"special_tokens": special_tokens} if special_tokens else {}))
    if config is not None:
        write_vl_config_json(d / "processor", config)
    data = tiny_vl_data_config(d / "processor", media, write_dataset(d / "rows.json", rows))
    (d / "data.json").write_text(json.dumps(data))
    return d / "data.json"


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    from mm_omni.models.qwen2_5_vl.hf_config import config_from_hf
    from tests.fixtures.qwen2_5_vl import tiny_vl_config

    d = tmp_path_factory.mktemp("vl_train")
    cfg = tiny_vl_config()
    write_vl_data(d, ROWS * 3, config=cfg)
    model = config_from_hf(cfg)
    model.text_decoder.pipeline_num_layers = [1, 2]  # PP=2: an uneven split (used by the PP run)
    (d / "model.json").write_text(model.model_dump_json())
    common = ["--mm-model", str(d / "model.json"), "--mm-data", str(d / "data.json"), "--seq-length", "512",
              "--train-iters", "3", "--lr", "1e-3", "--lr-decay-style", "constant", "--micro-batch-size", "2",
              "--global-batch-size", "4", "--log-interval", "1", "--num-workers", "0"]

    def records(name: str, nproc: int) -> dict:
        recs = [json.loads(Path(f"{d / name}.rank{r}").read_text()) for r in range(nproc)]
        return [r for r in recs if r["losses"]][-1]  # the last pipeline stage reports

    def run(layouts: dict) -> dict:
        """The one-process run, then every 2-process layout (name -> flags) back to back in one launch."""
        run_torchrun(WORKER, 1, str(d / "tp1"), str(d / "init.pt"), *common)
        runs = []
        for name, flags in layouts.items():
            runs += ["--next"] * bool(runs) + [str(d / name), *common, *flags]
        run_torchrun(MULTI, 2, str(d / "init.pt"), *runs)
        return {"tp1": records("tp1", 1), **{name: records(name, 2) for name in layouts}}

    return run


def _close(got: dict, ref: dict, what: str):
    assert got.keys() == ref.keys() and len(ref) == 3, what
    worst = max(abs(got[k] - ref[k]) / abs(ref[k]) for k in ref)
    print(f"{what}: max rel diff {worst:.2e}")
    assert worst <= RTOL, f"{what}: {got} vs {ref}"


def test_qwen2_5_vl_tp2_and_pp2_follow_one_process(launch):
    recs = launch({"tp2": ["--tensor-model-parallel-size", "2"], "pp2": ["--pipeline-model-parallel-size", "2"]})
    ref = recs["tp1"]
    assert len(set(ref["losses"].values())) == 3  # the weights move
    for name in ("tp2", "pp2"):
        _close(recs[name]["losses"], ref["losses"], f"{name} loss")
        _close(recs[name]["grad_norms"], ref["grad_norms"], f"{name} grad norm")
