"""Training speed on a mixed dataset of the kind users bring: ``mm_omni.train`` with the launcher's defaults vs
transformers' thinker in a plain training loop, on the same rows in the same order (GPU machine).

The dataset is generated (seeded): image sides 224-1008 px at a random aspect, audio clips of 2-30 s, answers of
300-6,000 characters; by default 1/3 of the rows image + audio, 1/3 image, 1/6 audio, 1/6 text only (``--mix``).
The model is Qwen2.5-Omni at 7B widths (``--depth reduced``: text 4 / vision 8 / audio 8 layers; ``full``: the
7B's 28 / 32 / 32), random weights, bf16; the tokenizer is the tiny local one (nothing is downloaded).

* ours: ``torchrun -m mm_omni.train`` with the flags of examples/qwen2.5omni/finetune_qwen2_5_omni_7b.sh (one
  GPU: TP1 PP1, no --load) and the launchers' token-budget packing (``--packing budget``: packs of up to
  ``--seq-length`` tokens, ``--ours-global-batch-size`` packs per optimizer step, chosen to hold about the tokens of
  transformers' step); ``--packing micro_batch``: ``--global-batch-size`` rows per step, the rows of each
  micro-batch of ``--ours-mbs`` concatenated;
* transformers: ``Qwen2_5OmniThinkerForConditionalGeneration`` (SDPA, bf16 weights, fused AdamW), the same rows
  in the same order, read by the same data loader (same workers), padded into micro-batches of ``--hf-mbs`` rows
  (each size measured; the best is the baseline), gradient accumulation to the same rows per optimizer step;
* the data loader alone (the rows per second the workers can hand out: a floor under both runs).

``--lora``: LoRA instead of full fine-tuning, with the README's LoRA example (``--lora-r 8 --lora-alpha 16``, targets
``linear_qkv linear_proj linear_fc1 linear_fc2``) on a model.json whose encoders are frozen as in
examples/qwen2.5omni/model_7b.json, so the adapters sit on the text decoder's linears only. Ours adds the
``--lora-*`` flags to the same command (bf16 base frozen, adapters trained by megatron's optimizer: fp32 main
copies); transformers wraps the thinker with peft on the decoder's q/k/v/o_proj (our fused ``linear_qkv`` and
``linear_proj``) and gate/up/down_proj (our fused ``linear_fc1`` and ``linear_fc2``), AdamW over the adapters
alone (bench/hf_thinker_loop.py). Neither side recomputes activations (ours has no recompute by default). MFU
then counts the FLOPs executed: the frozen base's forward and activation gradients, no weight gradients
(bench/lora_flops.py; the formula is printed).

``--tiny``: tiny widths and a few small rows, for a smoke run on the CPU (``MM_OMNI_DEVICE=cpu``).

Both run the same number of optimizer steps; the first ``--warmup`` steps are not timed, and an untimed
transformers run of ``--hf-warmup-steps`` steps comes before the measured ones (each of our runs is a process of
its own whose untimed first step pays the device's start-up; the transformers runs share one process). Prints tokens/s (real
tokens, padding not counted), MFU (model FLOPs of mm_omni.training.flops over the GPU's bf16 peak), peak GiB and
the ratio.

    python bench/train_real.py [--rows 48] [--steps 6] [--global-batch-size 8] [--hf-mbs 1,2,4] [--depth reduced]
    python bench/train_real.py --lora --depth full --ours-mbs 1,4 --hf-mbs 1,2,4    # LoRA on the whole 7B
    MM_OMNI_DEVICE=cpu python bench/train_real.py --tiny [--lora]                     # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import omni_step  # noqa: E402  (bench/omni_step.py: the 7B-width thinker config)
from hf_thinker_loop import hf_lora_leaves, run_hf  # noqa: E402
from lora_flops import FORMULA, lora_batch_flops  # noqa: E402

TINY_IDS = dict(image_token_index=1000, video_token_index=1001, audio_token_index=1002,
                vision_start_token_id=1003, vision_end_token_id=1004, audio_start_token_id=1005,
                audio_end_token_id=1006)
KINDS = ("image+audio", "image", "audio", "text")
QUESTIONS = {"image+audio": "<image><audio>Describe the image and what is said.", "image": "<image>What is in this image?",
             "audio": "<audio>What does the speaker say?", "text": "Tell me a long story about a cat and a fox."}
# generated rows: image side (px), audio length (s), answer length (characters)
MEDIA = dict(side=(224, 1008), seconds=(2.0, 30.0), chars=(300, 6000))
# --tiny: widths, rows and defaults of a CPU smoke run
TINY_MEDIA = dict(side=(56, 112), seconds=(1.0, 3.0), chars=(100, 600))
TINY_WIDTHS = dict(TEXT=dict(hidden=64, ffn=128, heads=4, groups=2, vocab=1024, layers=2, mrope=[2, 3, 3]),
                   VISION=dict(hidden=32, ffn=64, heads=2, layers=2), AUDIO=dict(hidden=32, ffn=64, heads=2, layers=2))
TINY_DEFAULTS = dict(rows=8, steps=2, global_batch_size=4, hf_mbs="1,2", ours_mbs="1,2", seq_length=2048,
                     image_max_pixels=112 * 112, out="/tmp/mm_omni_train_real_tiny")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/mm_omni_train_real")
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mix", default="2,2,1,1", help="weights of image+audio, image, audio, text-only rows")
    p.add_argument("--depth", choices=("reduced", "full"), default="reduced")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps of each run")
    p.add_argument("--warmup", type=int, default=1, help="first steps not timed")
    p.add_argument("--global-batch-size", type=int, default=8, help="rows per optimizer step (both runs)")
    p.add_argument("--ours-global-batch-size", type=int, default=None,
                   help="our samples per optimizer step when they differ from transformers' (budget packing: packs, "
                        "chosen so that both steps hold about the same tokens)")
    p.add_argument("--hf-mbs", default="1,2,4", help="transformers micro-batch sizes to measure")
    p.add_argument("--ours-mbs", default="1,4", help="our micro-batch sizes to measure (1: the launcher's; above 1 the "
                                                     "rows of a micro-batch are packed into one sequence)")
    p.add_argument("--num-workers", type=int, default=2, help="data-loader workers of both runs (the launcher's 2)")
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--image-max-pixels", type=int, default=1008 * 1008)
    p.add_argument("--only", choices=("both", "ours", "hf"), default="both")
    p.add_argument("--hf-warmup-steps", type=int, default=2,
                   help="optimizer steps of an untimed transformers run before the measured ones (0: none): the "
                        "first run in a process pays the device's start-up (context, GEMM heuristics, allocator "
                        "growth), which each of our runs pays in its own untimed first step")
    p.add_argument("--extra", default="", help="extra flags for mm_omni.train (e.g. '--encoder-cuda-graphs')")
    p.add_argument("--packing", choices=("micro_batch", "budget"), default="budget",
                   help="our packed runs: budget (the launchers' default) or micro_batch (the --ours-mbs sizes above 1, each micro-batch's rows "
                        "concatenated: same rows per step as transformers) or budget (every --ours-mbs size, "
                        "micro-batches of packs of up to --seq-length tokens: --global-batch-size counts packs)")
    p.add_argument("--tiny", action="store_true", help="tiny widths, 8 small rows: a smoke run (CPU)")
    lora = p.add_argument_group("LoRA (--lora; defaults: the README's LoRA example)")
    lora.add_argument("--lora", action="store_true", help="LoRA on the text decoder instead of full fine-tuning")
    lora.add_argument("--lora-r", type=int, default=8)
    lora.add_argument("--lora-alpha", type=float, default=16.0)
    lora.add_argument("--lora-targets", default="linear_qkv,linear_proj,linear_fc1,linear_fc2",
                      help="our megatron names (comma-separated), mapped to transformers' for peft")
    lora.add_argument("--hf-adapter-dtype", choices=("fp32", "bf16"), default="fp32",
                      help="peft's adapter weights: fp32 (peft's default, autocast_adapter_dtype) or the base's bf16")
    if p.parse_known_args()[0].tiny:
        p.set_defaults(**TINY_DEFAULTS)
    args = p.parse_args()
    args.lora_targets = [t for t in args.lora_targets.split(",") if t]
    if args.lora:
        hf_lora_leaves(args.lora_targets)  # a target the transformers side cannot map fails here, naming it
    return args


def packing_value(mode: str):
    """``--packing`` as this checkout's data.json schema spells it: the mode's name where the schema knows it;
    micro-batch concatenation is plain ``true`` in a schema whose only packing it is."""
    from mm_omni.config.data import DataloaderParam

    try:
        DataloaderParam(packing=mode)
        return mode
    except ValueError:
        if mode == "micro_batch":
            return True
        raise SystemExit(f"--packing {mode}: this checkout's dataloader_param.packing has no {mode!r} mode; "
                         "use --packing micro_batch") from None


def packed(args, mbs: int) -> bool:
    """Whether our run at ``mbs`` reads data_packed.json."""
    return args.packing == "budget" or mbs > 1


# ------------------------------------------------------------------------------------------------
# data and model
# ------------------------------------------------------------------------------------------------
def write_inputs(args) -> tuple[Path, Path, object]:
    """data.json, model.json and the transformers thinker config of the run."""
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config
    from tests.fixtures.media import write_dataset, write_image, write_wav
    from tests.fixtures.qwen2_5_omni import build_tiny_processor, tiny_data_config
    from tests.fixtures.tokenizer import CORPUS

    out = Path(args.out)
    media = out / "media"
    media.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    sizes = TINY_MEDIA if args.tiny else MEDIA
    weights = [float(w) for w in args.mix.split(",")]
    kinds = [KINDS[i] for i in range(4) for _ in range(round(args.rows * weights[i] / sum(weights)))]
    kinds = (kinds + ["text"] * args.rows)[: args.rows]
    rng.shuffle(kinds)
    text = CORPUS * (6000 // len(CORPUS) + 2)
    rows = []
    for i, kind in enumerate(kinds):
        row = {"messages": [{"role": "user", "content": QUESTIONS[kind]},
                            {"role": "assistant", "content": ""}]}
        if "image" in kind:
            (lo, hi), aspect = sizes["side"], rng.uniform(0.5, 2.0)
            side = rng.randint(lo, hi)
            w, h = side, min(hi, max(lo, int(side * aspect)))
            row["images"] = [write_image(media / f"img{i}.png", w, h, seed=i).name]
        if "audio" in kind:
            row["audios"] = [write_wav(media / f"aud{i}.wav", seconds=rng.uniform(*sizes["seconds"]),
                                       freq=200.0 + 10 * i).name]
        start, n = rng.randrange(len(CORPUS)), rng.randint(*sizes["chars"])
        row["messages"][1]["content"] = text[start:start + n]
        rows.append(row)
    build_tiny_processor(out / "processor", image_max_pixels=args.image_max_pixels)
    data = tiny_data_config(out / "processor", media, write_dataset(out / "rows.json", rows),
                            dataloader={"shuffle": False})
    data["dataset_param"]["preprocess_parameters"].update(image_max_pixels=args.image_max_pixels,
                                                          image_min_pixels=28 * 28)
    (out / "data.json").write_text(json.dumps(data, indent=1))
    data["dataloader_param"]["packing"] = packing_value(args.packing)
    (out / "data_packed.json").write_text(json.dumps(data, indent=1))
    omni_step.IDS.update(TINY_IDS)
    if args.tiny:
        for name, widths in TINY_WIDTHS.items():
            getattr(omni_step, name).update(widths)
    elif args.depth == "full":
        omni_step.TEXT.update(layers=28)
        omni_step.VISION.update(layers=32)
        omni_step.AUDIO.update(layers=32)
    cfg = omni_step.thinker_config()
    if args.depth == "full" and not args.tiny:
        cfg.vision_config.fullatt_block_indexes = [7, 15, 23, 31]
    model = from_hf_thinker_config(cfg)
    encoders = (model.image_encoder.vision_encoder, model.image_encoder.vision_projector,
                model.audio_encoder.audio_encoder)
    for module in (model.text_decoder, *encoders):
        module.bf16 = True
    if args.lora:  # examples/qwen2.5omni/model_7b.json's frozen encoders: the adapters go on the decoder only
        for module in encoders:
            module.freeze = True
    (out / "model.json").write_text(model.model_dump_json(indent=1))
    print(f"[data] {args.rows} rows: " + ", ".join(f"{k} {kinds.count(k)}" for k in KINDS))
    return out / "data.json", out / "model.json", cfg


def load_dataset(data_json: Path, seq_length: int):
    """The dataset both runs read (scanned once here: row lengths for the summary)."""
    from mm_omni.config.data import load_data_config
    from mm_omni.data import OmniSFTDataset

    return OmniSFTDataset(load_data_config(data_json), seq_length)


# ------------------------------------------------------------------------------------------------
# ours: mm_omni.train
# ------------------------------------------------------------------------------------------------
def run_ours(args, data_json: Path, model_json: Path, cfg, mbs: int) -> dict | None:
    """One ``mm_omni.train`` run; None (and a line) where it ran out of device memory."""
    gbs = args.ours_global_batch_size or args.global_batch_size
    if packed(args, mbs):
        data_json = data_json.with_name("data_packed.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "mm_omni.train",
           "--mm-model", str(model_json), "--mm-data", str(data_json),
           # the flags of examples/qwen2.5omni/finetune_qwen2_5_omni_7b.sh on one GPU (TP1 PP1, no --load)
           "--use-mcore-models", "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
           "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs), "--context-parallel-size", "1",
           "--tokenizer-type", "NullTokenizer", "--vocab-size", str(cfg.text_config.vocab_size),
           "--seq-length", str(args.seq_length),
           "--make-vocab-size-divisible-by", "1", "--normalization", "RMSNorm", "--use-fused-rmsnorm", "--swiglu",
           "--use-fused-swiglu", "--no-masked-softmax-fusion", "--lr", "1.0e-5", "--lr-decay-style", "cosine",
           "--weight-decay", "0", "--train-iters", str(args.steps), "--lr-warmup-fraction", "0.1",
           "--clip-grad", "0.0", "--adam-beta1", "0.9", "--adam-beta2", "0.999",
           "--no-gradient-accumulation-fusion", "--seed", "42", "--bf16", "--variable-seq-lengths",
           "--use-distributed-optimizer", "--num-workers", str(args.num_workers), "--use-flash-attn", "--log-interval", "1",
           "--log-tps", "--distributed-backend", "nccl", *args.extra.split()]
    if args.lora:
        cmd += ["--lora-target-modules", *args.lora_targets, "--lora-r", str(args.lora_r),
                "--lora-alpha", str(args.lora_alpha)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    log = proc.stdout + proc.stderr
    (Path(args.out) / f"ours_mbs{mbs}.log").write_text(log)
    if proc.returncode and "out of memory" in log.lower():
        print(f"[mm_omni] micro-batch {mbs}: out of device memory (log: {args.out}/ours_mbs{mbs}.log)")
        return None
    if proc.returncode:
        raise SystemExit(f"mm_omni.train failed ({proc.returncode}):\n{log[-6000:]}")
    steps = [(float(m.group(1)), float(m.group(2)))
             for m in re.finditer(r"elapsed time per iteration \(ms\): ([0-9.]+).*?tokens per sec per device: "
                                  r"([0-9.]+)", log)]
    timed = steps[args.warmup:]
    seconds = sum(ms for ms, _ in timed) / 1000
    tokens = sum(ms / 1000 * tps for ms, tps in timed)
    peak = re.search(r"peak memory per device: ([0-9.]+) GiB", log)
    loss = re.findall(r"lm loss: ([0-9.E+-]+)", log)
    trainable = re.search(r"LoRA r=.*?: (\d+) trainable of", log)
    return dict(name="mm_omni" + (f" {args.packing}" if packed(args, mbs) else ""), mbs=mbs, seconds=seconds,
                tokens=tokens, peak=float(peak.group(1)) or None if peak else None,  # 0.00 GiB: the CPU
                first_loss=float(loss[0]) if loss else None, step_ms=[ms for ms, _ in steps], trainable=int(trainable.group(1)) if trainable else None)


# ------------------------------------------------------------------------------------------------
# transformers: the thinker in a plain loop (bench/hf_thinker_loop.py), fed by the same data loader
# ------------------------------------------------------------------------------------------------
def loader(args, dataset, mbs: int):
    """The rows in dataset order, ``mbs`` per batch, encoded by ``--num-workers`` workers (as in ours)."""
    from mm_omni.data import build_dataloader

    return build_dataloader(dataset.cfg, micro_batch_size=mbs, seq_length=args.seq_length,
                            num_workers=args.num_workers, dataset=dataset)


def run_loader(args, dataset) -> dict:
    """The data pipeline alone: how fast the workers hand out the rows both runs consume."""
    n, tokens = args.steps * args.global_batch_size, 0
    start = None
    for i, batch in enumerate(_repeat(loader(args, dataset, 1), n)):
        if i == args.warmup * args.global_batch_size:
            start = time.perf_counter()
        if start is not None:
            tokens += int(batch["attention_mask"].sum())
    return dict(name="data loader", mbs=1, seconds=time.perf_counter() - start, tokens=tokens, peak=None,
                first_loss=None)


def _repeat(batches, n: int):
    """``n`` batches of a loader, starting it over when it runs out."""
    count = 0
    while True:
        for batch in batches:
            if count == n:
                return
            count += 1
            yield batch


def run_transformers(args, cfg, dataset, mbs: int, steps: int, warmup: int) -> dict:
    gbs = args.global_batch_size
    lora = (dict(r=args.lora_r, alpha=args.lora_alpha, targets=args.lora_targets, adapter_dtype=args.hf_adapter_dtype)
            if args.lora else None)
    batches = _repeat(loader(args, dataset, mbs), steps * gbs // mbs)
    return run_hf(cfg, batches, steps, warmup, gbs, mbs, lora)


# ------------------------------------------------------------------------------------------------
def main() -> None:
    args = parse()
    data_json, model_json, cfg = write_inputs(args)
    dataset = load_dataset(data_json, args.seq_length)
    lengths = sorted(dataset.lengths())
    print(f"[data] {len(lengths)} rows kept, tokens per row min {lengths[0]} / median {lengths[len(lengths) // 2]} / "
          f"max {lengths[-1]}, total {sum(lengths)}")
    from mm_omni.config.model import load_model_config
    from mm_omni.data import OmniCollator
    from mm_omni.models.omni_flops import omni_batch_flops
    from mm_omni.training.flops import peak_tflops
    from mm_omni.platform import device_name, release_cached_memory

    model_cfg = load_model_config(model_json)
    pad = dataset.encoder.tokens.pad
    order = [i % len(dataset) for i in range(args.steps * args.global_batch_size)][args.warmup * args.global_batch_size:]
    if args.lora:
        row_flops = {i: lora_batch_flops(model_cfg, OmniCollator(pad)([dataset[i]]), args.lora_r, args.lora_targets)
                     for i in set(order)}
    else:
        row_flops = {i: omni_batch_flops(model_cfg, OmniCollator(pad)([dataset[i]])) for i in set(order)}
    flops = sum(row_flops[i] for i in order)
    peak_tf = peak_tflops(device_name())
    results = [run_loader(args, dataset)]
    if args.only in ("both", "ours"):
        for mbs in (int(m) for m in args.ours_mbs.split(",")):
            result = run_ours(args, data_json, model_json, cfg, mbs)
            if result is not None:
                results.append(result)
    if args.only in ("both", "hf"):
        if args.hf_warmup_steps:  # untimed (every step counts as warm-up)
            run_transformers(args, cfg, dataset, int(args.hf_mbs.split(",")[0]), args.hf_warmup_steps,
                             args.hf_warmup_steps)
            release_cached_memory()
        for mbs in (int(m) for m in args.hf_mbs.split(",")):
            try:
                results.append(run_transformers(args, cfg, dataset, mbs, args.steps, args.warmup))
            except RuntimeError as err:  # out of memory at this micro-batch size
                print(f"[transformers] micro-batch {mbs}: {str(err).splitlines()[0]}")
            release_cached_memory()
    print(f"\n{device_name()}; {args.steps} optimizer steps of {args.global_batch_size} rows, "
          f"first {args.warmup} not timed; depth {'tiny' if args.tiny else args.depth}; our packing "
          f"{args.packing}" + (" (optimizer steps of --global-batch-size packs: its tokens per step differ from "
                               "transformers')" if args.packing == "budget" else ""))
    if args.lora:
        trainable = {r["name"].split()[0]: r["trainable"] for r in results if r.get("trainable")}  # one per side
        print(f"LoRA r={args.lora_r} alpha={args.lora_alpha:g} on the text decoder's {', '.join(args.lora_targets)} "
              f"(transformers: peft on {', '.join(hf_lora_leaves(args.lora_targets))}, {args.hf_adapter_dtype} "
              f"adapters); trainable parameters: " + ", ".join(f"{side} {n:,}" for side, n in trainable.items()))
        print(f"MFU: {FORMULA}")
    print(f"{'run':20s} {'MBS':>4s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak GiB':>9s} {'first loss':>10s}")
    for r in results:
        tps = r["tokens"] / max(r["seconds"], 1e-9)
        tf = flops / max(r["seconds"], 1e-9) / 1e12 if r["name"] != "data loader" else 0.0
        mfu = f"{tf / peak_tf:.1%}" if peak_tf and tf else "n/a"
        peak = f"{r['peak']:.1f}" if r["peak"] is not None else "n/a"
        r["tps"] = tps
        print(f"{r['name']:20s} {r['mbs']:4d} {tps:10.0f} {tf:8.1f} {mfu:>6s} {peak:>9s} {r['first_loss'] or 0:10.5f}")
    ours = [r for r in results if r["name"].startswith("mm_omni")]
    hf = [r for r in results if r["name"].startswith("transformers")]
    if ours and hf:
        best = max(hf, key=lambda r: r["tps"])
        for r in ours:
            print(f"ratio: {r['name']} (MBS {r['mbs']}) {r['tps']:.0f} tokens/s / {best['name']} (best, MBS "
                  f"{best['mbs']}) {best['tps']:.0f} = {r['tps'] / best['tps']:.2f}x; step times (ms): "
                  + ", ".join(f"{ms:.0f}" for ms in r["step_ms"]))


if __name__ == "__main__":
    main()
