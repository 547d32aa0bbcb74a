"""The tiny CPU demo of Qwen3-Omni: a random MoE thinker fine-tuned with expert and pipeline parallelism, exported
with its talker, nothing downloaded.

    python examples/qwen3omni/demo.py [--workdir demo_out_qwen3] [--train-iters 12]

1. builds a tiny random ``Qwen3OmniMoeForConditionalGeneration`` (thinker with 8 experts per layer and deepstack
   vision, talker with its code predictor, code2wav) in Hugging Face format, a tiny processor beside it, and
   ms-swift jsonl rows (text, image, audio, image + audio) read through data.json (template ``qwen3_omni``);
2. ``mm-convert Qwen3_OmniConverter hf_to_mm`` to PP=2 (decoder layers [1, 2]: the deepstack additions of
   layers 1 and 2 cross the stage boundary) x EP=2;
3. fine-tunes with ``torchrun --nproc-per-node 4 -m mm_omni.train`` (PP 2 x DP 2, the experts split over EP 2;
   gloo on CPU), failing unless the logged loss falls; the load-balancing loss is logged;
4. ``mm-convert Qwen3_OmniConverter mm_to_hf`` back;
5. checks the export with transformers: ``Qwen3OmniMoeForConditionalGeneration.from_pretrained`` loads it with
   nothing missing, the thinker changed, the talker and code2wav are bit-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))  # tests.fixtures: the tiny configs, processor and media writers
sys.path.insert(0, str(HERE.parent))  # examples/demo_tools.py

from demo_tools import Timer, free_port, log, read_safetensors, run  # noqa: E402

ROWS = [
    ("What is 2+2?", "4", {}),
    ("<image>What is in this image?", "A cat is playing with a ball.", {"images": ["cat.png"]}),
    ("<audio>What did the speaker say?", "The speaker said hello.", {"audios": ["hello.wav"]}),
    ("<image><audio>Describe the image and the audio.", "The quick brown fox and a hello.",
     {"images": ["fox.png"], "audios": ["hello.wav"]}),
]
TRAINED = ("thinker.model.", "thinker.lm_head.")  # the encoders are frozen (model_30b_a3b.json's choice)
UNCHANGED = ("thinker.visual.", "thinker.audio_tower.", "talker.", "code2wav.")


def build_hf_model(hf_dir: Path) -> None:
    import transformers
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeForConditionalGeneration

    from tests.fixtures.qwen3_omni_moe import (
        TINY_CODE2WAV, TINY_TALKER, build_tiny_qwen3_omni_processor, tiny_thinker_config,
    )

    transformers.logging.set_verbosity_error()  # tiny vocabularies and rope keys of the tiny talker
    thinker = tiny_thinker_config(router_aux_loss_coef=0.01).to_dict()
    thinker["audio_config"]["num_mel_bins"] = 128  # the processor's feature extractor (Whisper, 128 mel)
    cfg = Qwen3OmniMoeConfig(thinker_config=thinker, talker_config=TINY_TALKER, code2wav_config=TINY_CODE2WAV,
                             enable_audio_output=True)
    torch.manual_seed(0)
    model = Qwen3OmniMoeForConditionalGeneration(cfg)
    with torch.no_grad():  # transformers leaves the talker's fused experts uninitialised (torch.empty: may hold NaN)
        for name, p in model.talker.named_parameters():
            if ".experts." in name:
                p.normal_(0.0, 0.02)
    model.save_pretrained(hf_dir)
    build_tiny_qwen3_omni_processor(hf_dir)


def build_data(root: Path, hf_dir: Path) -> Path:
    from tests.fixtures.media import write_image, write_wav

    media = root / "data"
    media.mkdir(parents=True, exist_ok=True)
    write_image(media / "cat.png", 64, 64, seed=0)
    write_image(media / "fox.png", 96, 64, seed=1)
    write_wav(media / "hello.wav", seconds=1.5)
    # ms-swift's jsonl rows, absolute media paths
    lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                         **{k: [str(media / f) for f in v] for k, v in m.items()}}) for q, a, m in ROWS]
    (media / "sft_data.jsonl").write_text("\n".join(lines) + "\n")
    data = json.loads((HERE / "data_30b_a3b.json").read_text())
    pp, bp = data["dataset_param"]["preprocess_parameters"], data["dataset_param"]["basic_parameters"]
    pp.update(model_name_or_path=str(hf_dir), image_max_pixels=64 * 64, image_min_pixels=32 * 32)
    bp.update(dataset_dir=str(media), dataset=str(media / "sft_data.jsonl"), cache_dir=str(root / "cache"),
              preprocessing_num_workers=1)
    path = root / "data.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def hf_to_mm(hf_dir: Path, mm_dir: Path, logs: Path) -> Path:
    run([str(BIN / "mm-convert"), "Qwen3_OmniConverter", "hf_to_mm", "--cfg.mm_dir", str(mm_dir),
         "--cfg.hf_config.hf_dir", str(hf_dir), "--cfg.parallel_config.llm_pp_layers", "[[1,2]]",
         "--cfg.parallel_config.vit_pp_layers", "[[4,0]]", "--cfg.parallel_config.audio_pp_layers", "[[2,0]]",
         "--cfg.parallel_config.ep_size", "2"], logs / "hf_to_mm.log")
    model = json.loads((mm_dir / "model.json").read_text())
    for block, parts in (("image_encoder", ("vision_encoder", "vision_projector")), ("audio_encoder", ("audio_encoder",))):
        for part in parts:
            model[block][part]["freeze"] = True
    path = mm_dir.parent / "model.json"
    path.write_text(json.dumps(model, indent=2))
    return path


def train(model_json: Path, data_json: Path, mm_dir: Path, save: Path, iters: int, lr: float,
          logs: Path) -> tuple[list[float], list[float]]:
    out = run([str(BIN / "torchrun"), "--nproc-per-node=4", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
               "-m", "mm_omni.train", "--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2",
               "--micro-batch-size", "1", "--global-batch-size", "4", "--seq-length", "1024",
               "--train-iters", str(iters), "--lr", str(lr), "--lr-decay-style", "cosine", "--lr-warmup-fraction",
               "0.1", "--weight-decay", "0", "--clip-grad", "1.0", "--seed", "42", "--load", str(mm_dir),
               "--save", str(save), "--no-save-optim", "--no-save-rng", "--no-load-optim", "--no-load-rng",
               "--num-workers", "0", "--mm-model", str(model_json), "--mm-data", str(data_json),
               "--log-interval", "1", "--use-mcore-models", "--distributed-backend", "nccl"], logs / "train.log")
    losses = [float(m) for m in re.findall(r"\| lm loss: ([0-9.eE+-]+) \|", out)]
    balance = [float(m) for m in re.findall(r"\| load_balancing_loss: ([0-9.eE+-]+) \|", out)]
    if len(losses) != iters:
        raise SystemExit(f"[demo] expected {iters} logged losses, found {len(losses)}; see {logs / 'train.log'}")
    return losses, balance


def mm_to_hf(save: Path, hf_dir: Path, out: Path, logs: Path) -> None:
    run([str(BIN / "mm-convert"), "Qwen3_OmniConverter", "mm_to_hf", "--cfg.save_hf_dir", str(out),
         "--cfg.mm_dir", str(save), "--cfg.hf_config.hf_dir", str(hf_dir)], logs / "mm_to_hf.log")


def check(hf_dir: Path, out_dir: Path) -> dict:
    import transformers
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeForConditionalGeneration

    transformers.logging.set_verbosity_error()
    sa, sb = read_safetensors(out_dir), read_safetensors(hf_dir)
    if set(sa) != set(sb):
        raise SystemExit(f"[demo] exported keys differ: {sorted(set(sa) ^ set(sb))[:8]}")
    changed = {k for k in sa if not torch.equal(sa[k], sb[k])}
    for prefix in UNCHANGED:
        bad = sorted(k for k in changed if k.startswith(prefix))
        if bad or not any(k.startswith(prefix) for k in sa):
            raise SystemExit(f"[demo] {prefix}* should be present and unchanged; changed: {bad[:5]}")
    for prefix in TRAINED:
        if not any(k.startswith(prefix) for k in changed):
            raise SystemExit(f"[demo] no {prefix}* tensor changed: training did not reach them")
    model, info = Qwen3OmniMoeForConditionalGeneration.from_pretrained(out_dir, output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"] or model.talker is None or model.code2wav is None:
        raise SystemExit(f"[demo] the export does not load whole: {info}")
    return dict(changed=len(changed), total=len(sa))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=REPO / "demo_out_qwen3")
    ap.add_argument("--train-iters", type=int, default=12)
    ap.add_argument("--lr", type=float, default=5e-3)
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    root = a.workdir.resolve()
    shutil.rmtree(root, ignore_errors=True)
    logs = root / "logs"
    logs.mkdir(parents=True)
    hf_dir, mm_dir, save, out = (root / "ckpt" / n for n in ("hf_path", "mm_path", "save_dir", "mm_to_hf"))
    t = Timer()
    t("build tiny HF Qwen3-Omni (thinker, talker, code2wav) + processor", build_hf_model, hf_dir)
    data_json = t("build tiny ms-swift jsonl dataset", build_data, root, hf_dir)
    model_json = t("mm-convert hf_to_mm (PP2 x EP2)", hf_to_mm, hf_dir, mm_dir, logs)
    losses, balance = t(f"torchrun x4: {a.train_iters} steps", train, model_json, data_json, mm_dir, save,
                        a.train_iters, a.lr, logs)
    log(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f}; load-balancing loss first "
        f"{balance[0] if balance else float('nan'):.4f}")
    if not losses[-1] < 0.7 * losses[0]:
        raise SystemExit(f"[demo] the loss did not fall clearly: {losses[0]:.4f} -> {losses[-1]:.4f}")
    t("mm-convert mm_to_hf", mm_to_hf, save, hf_dir, out, logs)
    res = t("check with transformers", check, hf_dir, out)
    log(f"transformers: loads with the talker and code2wav; {res['changed']}/{res['total']} tensors changed "
        "(thinker decoder), encoders / talker / code2wav identical")
    res.update(first_loss=losses[0], last_loss=losses[-1], balance=balance, wall_s=time.perf_counter() - start)
    log(f"OK in {res['wall_s']:.0f}s (outputs in {root})")
    return res


if __name__ == "__main__":
    main()
