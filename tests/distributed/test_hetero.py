"""``--hetero-parallel`` on 4 gloo processes follows the homogeneous run of the same layout over 3 steps
(losses and grad norms, distributed optimizer, fp32; rel 1e-5 — measured <= 2e-7: only the
summation order of the encoders' TP-split matmuls differs):

- encoders pure DP (tp 1: media split over each decoder TP group, gradients summed over all 4 ranks)
  with the decoder at TP2 x DP2, against every module at TP2 x DP2;
- encoders pure DP over all 4 ranks with the decoder at TP2 x PP2 (both stages encode a share of the
  step's media ahead of the pipeline schedule), against TP2 x PP2 (encoders TP2 on the first stage);
- encoders pure DP over all 4 ranks with the decoder at PP2 x DP2, against PP2 x DP2;
- encoders pure DP over each CP group (media split, features' gradient summed over CP) with the
  decoder at CP2 x DP2, against every module at CP2 x DP2 (encoders whole on each CP rank).

Micro-batches of 4 rows mix text-only, image, audio and image + audio rows: images of different
sizes and several clips are split across a TP group, and a rank's share is sometimes empty (dummy
forward)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import tiny_thinker_config
from tests.distributed.test_train_omni import ROWS, write_omni_data
from tests.distributed.torchrun import run_torchrun

WORKER = Path(__file__).with_name("hetero_worker.py")
RTOL = 1e-5
pytestmark = pytest.mark.distributed


def test_hetero_encoders_dp_follow_homogeneous(tmp_path):
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config

    write_omni_data(tmp_path, ROWS * 6)
    cases = []
    for case, tp, pp, cp in (("tp2dp2", 2, 1, 1), ("tp2pp2", 2, 2, 1), ("pp2dp2", 1, 2, 1), ("cp2dp2", 1, 1, 2)):
        model = from_hf_thinker_config(tiny_thinker_config())
        if pp > 1:
            model.text_decoder.pipeline_num_layers = [1, 2]
        (tmp_path / f"{case}.json").write_text(model.model_dump_json())
        # MindSpeed-MM's hetero keys; encoders stay tp 1
        model.text_decoder.tp, model.text_decoder.pp, model.text_decoder.cp = tp, pp, cp
        (tmp_path / f"{case}_hetero.json").write_text(model.model_dump_json())
        cases += [case, str(tmp_path / f"{case}.json"), str(tmp_path / f"{case}_hetero.json")]

    flags = ["--mm-data", str(tmp_path / "data.json"), "--seq-length", "512", "--train-iters", "3", "--lr", "1e-3",
             "--lr-decay-style", "constant", "--micro-batch-size", "4", "--global-batch-size", "8",
             "--log-interval", "1", "--num-workers", "0", "--use-distributed-optimizer"]
    out = tmp_path / "result"
    stdout = run_torchrun(WORKER, 4, str(out), *cases, "--", *flags)
    assert "imbalance max/mean" in stdout
    assert "items over 4 ranks" in stdout  # tp2pp2: both stages' TP ranks encode a share
    checked = {"tp2dp2": 0, "tp2pp2": 0, "pp2dp2": 0, "cp2dp2": 0}
    for rank in range(4):
        rec = json.loads(Path(f"{out}.rank{rank}").read_text())
        for case in checked:
            ref, got = rec[f"{case} homogeneous"], rec[f"{case} hetero"]
            if not ref["losses"]:  # not a last pipeline stage
                continue
            checked[case] += 1
            for key in ("losses", "grad_norms"):
                assert got[key].keys() == ref[key].keys() == {"1", "2", "3"}
                worst = max(abs(got[key][k] - ref[key][k]) / abs(ref[key][k]) for k in ref[key])
                print(f"{case} rank {rank} {key}: max rel diff {worst:.2e}")  # the measured agreement (-s)
                assert worst <= RTOL, (case, rank, key, got[key], ref[key])
    assert checked == {"tp2dp2": 4, "tp2pp2": 2, "pp2dp2": 2, "cp2dp2": 4}


def test_hetero_encoders_on_every_stage_resume_exactly(tmp_path):
    """Decoder PP2 x DP2 with the encoders on all 4 ranks, overlapped gradient reduction and the
    distributed optimizer: 2 steps + save + resume = 3 straight steps (loss and grad norm of step 3
    bit-equal); the later stage's files hold no encoder weights (its copies come from the first stage)."""
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config

    write_omni_data(tmp_path, ROWS * 6)
    model = from_hf_thinker_config(tiny_thinker_config())
    model.text_decoder.pipeline_num_layers = [1, 2]
    model.text_decoder.pp = 2
    (tmp_path / "model.json").write_text(model.model_dump_json())
    flags = ["--mm-data", str(tmp_path / "data.json"), "--seq-length", "512", "--lr", "1e-3",
             "--lr-decay-style", "constant", "--micro-batch-size", "4", "--global-batch-size", "16",
             "--log-interval", "1", "--num-workers", "0", "--use-distributed-optimizer", "--overlap-grad-reduce"]
    out = tmp_path / "result"
    run_torchrun(WORKER.with_name("hetero_resume_worker.py"), 4, str(out), str(tmp_path / "model.json"),
                 str(tmp_path / "ckpt"), "--", *flags)
    last = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (2, 3)]  # the last stage's ranks
    for rec in last:
        assert rec["C"]["losses"].keys() == {"3"}
        for key in ("losses", "grad_norms"):
            assert rec["C"][key]["3"] == rec["A"][key]["3"], (key, rec)
            assert rec["B"][key]["2"] == rec["A"][key]["2"], (key, rec)
    first, later = (torch_load(tmp_path / "ckpt" / "iter_0000002" / f"mp_rank_00_{s:03d}" / "model_optim_rng.pt")
                    for s in (0, 1))
    assert any(k.startswith("image_encoder.") for k in first["model"]) and any(
        k.startswith("audio_encoder.") for k in first["model"])
    assert not any(k.startswith(("image_encoder.", "audio_encoder.")) for k in later["model"])


def torch_load(path):
    import torch
    from megatron.core.safe_globals import register_safe_globals

    register_safe_globals()
    return torch.load(path, map_location="cpu", weights_only=True)


def test_converted_vit_tp1_checkpoint_loads_into_hetero_layout(tmp_path):
    """mm-convert ``--cfg.parallel_config.tp_size 2 vit_tp_size 1 audio_tp_size 1`` (the seed's hetero
    recipe) -> each rank loads its own file into decoder TP2 + tp=1 encoders; logits = transformers' (1e-5)."""
    from tests.unit.converters.conftest import make_hf_checkpoint
    from tests.unit.converters.helpers import hf_to_mm, layout

    hf_dir = make_hf_checkpoint(tmp_path / "hf", perturb=0.05)
    mm_dir = hf_to_mm(hf_dir, tmp_path / "mm", layout([[3]], [[4]], [[3]], tp=2, vit_tp=1, audio_tp=1))
    out = run_torchrun(WORKER.with_name("hetero_ckpt_worker.py"), 2, str(mm_dir), str(hf_dir), timeout=300)
    assert out.count("HETERO_CKPT_OK") == 2, out
    print(*(line for line in out.splitlines() if "HETERO_CKPT_OK" in line), sep="\n")  # measured error (-s)
    assert "'image_encoder': 1" in out and "'audio_encoder': 1" in out, out  # the media really went through the split
