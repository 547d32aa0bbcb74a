"""The tiny CPU demo: a whole MindSpeed-MM style fine-tune of a random Qwen2.5-Omni, nothing downloaded.

    python examples/qwen2.5omni/demo.py [--workdir demo_out] [--nproc 4] [--train-iters 30]

1. builds a tiny random ``Qwen2_5OmniForConditionalGeneration`` (thinker + talker + token2wav) in Hugging Face
   format, with a tiny tokenizer/processor beside it, and a tiny dataset (text, image, audio, a video with its
   own audio track, image + audio) as ``data.json`` in MindSpeed-MM's shape;
2. ``mm-convert Qwen2_5_OmniConverter hf_to_mm`` to TP=2 / PP=2 (text layers [1, 2], encoders on stage 0);
3. fine-tunes with ``torchrun --nproc-per-node 4 -m mm_omni.train`` (gloo on CPU, vision encoder + projector frozen as
   in MindSpeed-MM's model_7b.json) and fails unless the logged loss falls;
4. ``mm-convert Qwen2_5_OmniConverter mm_to_hf`` back to Hugging Face;
5. loads the result with transformers and checks it: the trained thinker modules changed, the frozen vision
   encoder and the talker / token2wav are bit-identical, transformers' own loss on the demo rows fell, and
   ``generate`` runs.

Each step prints its wall time. ``bash examples/qwen2.5omni/demo.sh`` sets up the environment first.
"""

from __future__ import annotations

import argparse
import itertools
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
sys.path.insert(0, str(REPO))  # tests.fixtures: the tiny processor and media writers
sys.path.insert(0, str(HERE.parent))  # examples/demo_tools.py

from demo_tools import Timer, free_port, log, read_safetensors, run  # noqa: E402

# A thinker small enough to train in seconds on a CPU; special token ids = the tiny processor's.
TEXT = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]})
VISION = dict(depth=4, hidden_size=32, intermediate_size=44, num_heads=2, in_channels=3, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=56, out_hidden_size=64,
              fullatt_block_indexes=[1, 3], hidden_act="silu")
AUDIO = dict(num_mel_bins=128, encoder_layers=3, encoder_attention_heads=4, encoder_ffn_dim=64, d_model=32,
             max_source_positions=1500, n_window=8, output_dim=64)
TALKER = dict(vocab_size=64, embedding_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=1, head_dim=16,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
TOKEN2WAV = dict(
    dit_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, emb_dim=16,
                    num_embeds=32, mel_dim=8, enc_emb_dim=8, enc_dim=8, enc_channels=[16, 16, 16, 16, 48],
                    enc_attention_channels=8, enc_se_channels=8, look_ahead_layers=[1], look_backward_layers=[0]),
    bigvgan_config=dict(mel_dim=8, upsample_initial_channel=16, upsample_rates=[2, 2], upsample_kernel_sizes=[4, 4],
                        resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3, 5]]))

ROWS = [
    ("What is 2+2?", "4", {}),
    ("<image>What is in this image?", "A cat is playing with a ball.", {"images": ["cat.png"]}),
    ("<audio>What did the speaker say?", "The speaker said hello.", {"audios": ["hello.wav"]}),
    ("<video>Describe the video and the audio.", "A dog and a hello.", {"videos": ["dog.mp4"]}),
    ("<image><audio>Compare these two pictures.", "The quick brown fox jumps over the lazy dog.",
     {"images": ["fox.png"], "audios": ["hello.wav"]}),
    ("What is she doing?", "She is playing with a ball.", {}),
]
LAYOUT = dict(llm="[[1,2]]", vit="[[4,0]]", audio="[[3,0]]", tp="2")  # TP=2 x PP=2 = 4 processes
TRAINED = ("thinker.model.", "thinker.lm_head.", "thinker.audio_tower.")  # vision is frozen (model_7b.json style)
UNCHANGED = ("thinker.visual.", "talker.", "token2wav.")


# -- 1. model, processor, data ------------------------------------------------------------------
def build_hf_model(hf_dir: Path) -> None:
    import transformers
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    from tests.fixtures.qwen2_5_omni import TINY_SPECIAL_TOKENS, build_tiny_processor

    transformers.logging.set_verbosity_error()  # the tiny vocabulary trips token-range warnings
    ids = TINY_SPECIAL_TOKENS
    thinker = dict(text_config=TEXT, vision_config=VISION, audio_config=AUDIO,
                   image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
                   audio_token_index=ids["<|AUDIO|>"], vision_start_token_id=ids["<|vision_bos|>"],
                   vision_end_token_id=ids["<|vision_eos|>"], audio_start_token_id=ids["<|audio_bos|>"],
                   audio_end_token_id=ids["<|audio_eos|>"])
    cfg = Qwen2_5OmniConfig(thinker_config=thinker, talker_config=TALKER, token2wav_config=TOKEN2WAV,
                            enable_audio_output=True)
    torch.manual_seed(0)
    model = Qwen2_5OmniForConditionalGeneration(cfg)
    model.save_pretrained(hf_dir)
    # the speaker table Qwen2.5-Omni's from_pretrained reads (voice conditioning of token2wav): tiny stand-ins
    mel = TOKEN2WAV["dit_config"]["mel_dim"]
    torch.save({"Chelsie": {"bos_token": ids["<|im_start|>"], "cond": torch.randn(1, mel),
                            "ref_mel": torch.randn(1, 32, mel)}}, hf_dir / "spk_dict.pt")
    build_tiny_processor(hf_dir)  # tokenizer + image/video processor + feature extractor beside the weights


def build_data(root: Path, hf_dir: Path) -> Path:
    from tests.fixtures.media import write_image, write_video, write_wav

    media = root / "data"
    media.mkdir(parents=True, exist_ok=True)
    write_image(media / "cat.png", 56, 56, seed=0)
    write_image(media / "fox.png", 84, 56, seed=1)
    write_wav(media / "hello.wav", seconds=1.0)
    write_video(media / "dog.mp4", seconds=2.0, fps=2, size=56, with_audio=True)
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], **m}
            for q, a, m in ROWS]
    (media / "demo.json").write_text(json.dumps(rows, indent=1))
    # MindSpeed-MM's data_7b.json, pointed at the tiny model and data
    data = json.loads((HERE / "data_7b.json").read_text())
    pp, bp = data["dataset_param"]["preprocess_parameters"], data["dataset_param"]["basic_parameters"]
    pp.update(model_name_or_path=str(hf_dir), image_max_pixels=56 * 56, video_max_pixels=56 * 56,
              use_audio_in_video=True)
    bp.update(dataset_dir=str(media), dataset=str(media / "demo.json"), cache_dir=str(root / "cache"),
              preprocessing_num_workers=1)
    path = root / "data.json"
    path.write_text(json.dumps(data, indent=2))
    return path


# -- 2-4. convert, train, convert back ------------------------------------------------------------
def hf_to_mm(hf_dir: Path, mm_dir: Path, logs: Path) -> Path:
    run([str(BIN / "mm-convert"), "Qwen2_5_OmniConverter", "hf_to_mm", "--cfg.mm_dir", str(mm_dir),
         "--cfg.hf_config.hf_dir", str(hf_dir), "--cfg.parallel_config.llm_pp_layers", LAYOUT["llm"],
         "--cfg.parallel_config.vit_pp_layers", LAYOUT["vit"], "--cfg.parallel_config.audio_pp_layers",
         LAYOUT["audio"], "--cfg.parallel_config.tp_size", LAYOUT["tp"]], logs / "hf_to_mm.log")
    model = json.loads((mm_dir / "model.json").read_text())
    for part in ("vision_encoder", "vision_projector"):  # frozen, as in MindSpeed-MM's model_7b.json
        model["image_encoder"][part]["freeze"] = True
    path = mm_dir.parent / "model.json"
    path.write_text(json.dumps(model, indent=2))
    return path


def train(model_json: Path, data_json: Path, mm_dir: Path, save: Path, nproc: int, iters: int, lr: float,
          logs: Path) -> list[float]:
    out = run([str(BIN / "torchrun"), f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", "-m", "mm_omni.train",
               "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
               # global batch = micro-batch 2 x 2 micro-batches x DP (nproc / 4)
               "--micro-batch-size", "2", "--global-batch-size", str(2 * 2 * (nproc // 4)),
               "--seq-length", "512", "--train-iters", str(iters), "--lr", str(lr), "--lr-decay-style", "cosine",
               "--lr-warmup-fraction", "0.1", "--weight-decay", "0", "--clip-grad", "1.0", "--seed", "42", "--load", str(mm_dir), "--save", str(save),
               "--no-save-optim", "--no-save-rng", "--no-load-optim", "--no-load-rng", "--num-workers", "0",
               "--mm-model", str(model_json), "--mm-data", str(data_json), "--log-interval", "1", "--log-tps",
               "--use-mcore-models", "--use-flash-attn", "--use-fused-rmsnorm", "--distributed-backend", "nccl"],
              logs / "train.log")
    losses = [float(m) for m in re.findall(r"\| lm loss: ([0-9.eE+-]+) \|", out)]
    if len(losses) != iters:
        raise SystemExit(f"[demo] expected {iters} logged losses, found {len(losses)}; see {logs / 'train.log'}")
    return losses


def mm_to_hf(save: Path, hf_dir: Path, out: Path, logs: Path) -> None:
    run([str(BIN / "mm-convert"), "Qwen2_5_OmniConverter", "mm_to_hf", "--cfg.save_hf_dir", str(out),
         "--cfg.mm_dir", str(save), "--cfg.hf_config.hf_dir", str(hf_dir)], logs / "mm_to_hf.log")


# -- 5. check the result with transformers --------------------------------------------------------
def hf_loss(model, data_json: Path) -> float:
    """transformers' thinker: mean label-token loss over the demo rows (collated by our data pipeline)."""
    from mm_omni.config.data import load_data_config
    from mm_omni.data import build_dataloader

    cfg = load_data_config(str(data_json))
    cfg.dataloader_param.packing = False  # one padded row per batch: transformers' thinker takes no cu_seqlens
    loader = build_dataloader(cfg, micro_batch_size=1, seq_length=512)
    epoch = itertools.islice(loader, len(loader.dataset))  # the training sampler never stops: one pass
    keys = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_grid_thw", "pixel_values_videos",
            "video_grid_thw", "input_features", "feature_attention_mask", "video_second_per_grid")
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in epoch:
            inputs = {k: batch[k] for k in keys if k in batch}
            inputs["use_audio_in_video"] = bool(batch["use_audio_in_video"].any())
            logits = model.thinker(**inputs).logits.float()
            labels = batch["labels"][:, 1:]
            valid = labels != -100
            total += float(torch.nn.functional.cross_entropy(logits[:, :-1][valid], labels[valid], reduction="sum"))
            count += int(valid.sum())
    return total / count


def check(hf_dir: Path, out_dir: Path, data_json: Path) -> dict:
    import transformers
    from transformers import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniProcessor

    transformers.logging.set_verbosity_error()
    sa, sb = read_safetensors(out_dir), read_safetensors(hf_dir)  # checkpoint names (transformers renames in memory)
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
    before = Qwen2_5OmniForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    after = Qwen2_5OmniForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32).eval()
    loss_before, loss_after = hf_loss(before, data_json), hf_loss(after, data_json)
    if not loss_after < loss_before:
        raise SystemExit(f"[demo] transformers' loss on the demo rows did not fall: {loss_before} -> {loss_after}")
    processor = Qwen2_5OmniProcessor.from_pretrained(out_dir)
    prompt = processor.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                           add_generation_prompt=True, tokenize=False)
    inputs = processor(text=prompt, return_tensors="pt")
    with torch.no_grad():
        # the thinker's text generation (Omni's own generate() switched text-only mode from return_audio=False
        # to generation_mode="text" across transformers releases; the thinker's generate() is stable)
        ids = after.thinker.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    return dict(changed=len(changed), total=len(sa), loss_before=loss_before, loss_after=loss_after, answer=answer)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=REPO / "demo_out")
    ap.add_argument("--nproc", type=int, default=4, help="processes = TP 2 x PP 2 (x DP)")
    ap.add_argument("--train-iters", type=int, default=30)
    ap.add_argument("--lr", type=float, default=5e-3)
    a = ap.parse_args(argv)
    if a.nproc < 4 or a.nproc % 4:
        ap.error(f"--nproc {a.nproc}: the demo's layout is TP 2 x PP 2, so give a multiple of 4")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never wait on a model hub
    start = time.perf_counter()
    root = a.workdir.resolve()
    shutil.rmtree(root, ignore_errors=True)
    logs = root / "logs"
    logs.mkdir(parents=True)
    hf_dir, mm_dir, save, out = (root / "ckpt" / n for n in ("hf_path", "mm_path", "save_dir", "mm_to_hf"))
    t = Timer()
    t("build tiny HF Qwen2.5-Omni + processor", build_hf_model, hf_dir)
    data_json = t("build tiny dataset", build_data, root, hf_dir)
    model_json = t("mm-convert hf_to_mm (TP2, PP2)", hf_to_mm, hf_dir, mm_dir, logs)
    losses = t(f"torchrun x{a.nproc}: {a.train_iters} steps", train, model_json, data_json, mm_dir, save, a.nproc,
               a.train_iters, a.lr, logs)
    log(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f}")
    if not losses[-1] < 0.5 * losses[0]:
        raise SystemExit(f"[demo] the loss did not fall clearly: {losses[0]:.4f} -> {losses[-1]:.4f}")
    t("mm-convert mm_to_hf", mm_to_hf, save, hf_dir, out, logs)
    res = t("check with transformers", check, hf_dir, out, data_json)
    log(f"transformers: {res['changed']}/{res['total']} tensors changed (thinker text + audio), vision/talker/"
        f"token2wav identical; its loss on the demo rows {res['loss_before']:.4f} -> {res['loss_after']:.4f}; "
        f"generate -> {res['answer']!r}")
    res.update(first_loss=losses[0], last_loss=losses[-1], wall_s=time.perf_counter() - start)
    log(f"OK in {res['wall_s']:.0f}s (outputs in {root})")
    return res


if __name__ == "__main__":
    main()
