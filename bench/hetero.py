"""Heterogeneous parallel throughput: homogeneous vs hetero vs hetero + cost balancing, in one launch.

    torchrun --nproc_per_node 4 bench/hetero.py --out /tmp/hetero_bench [--tp 2] [--iters 8]
    torchrun --nproc_per_node 4 bench/hetero.py --out /tmp/hetero_smoke --smoke   # CPU (gloo), tiny widths

Trains (``mm_omni.train``, random init, bf16, Adam) one encoder-heavy dataset three times with the
same flags and global batch, Qwen2.5-Omni 7B widths at reduced depth (text 4, vision 8, audio 8 layers):

* homogeneous — every module at the decoder's TP (``--tensor-model-parallel-size T``): each TP group
  encodes its micro-batch's media with TP-sharded encoders;
* hetero (count) — ``--hetero-parallel``, decoder ``tp: T``, encoders ``tp: 1``: each rank of a TP group
  encodes a share of the media with a whole encoder, shares cut by item count;
* hetero (cost) — the same, shares balanced by cost (patches, mel frames; the default).

Rows mix a few media sizes, as real batches do: one 896x896 image (4096 patches) + 30 s of audio,
four 224x224 images + 10 s, two 448x448 images + 20 s, one 112x112 image + 2 s. Prints the median
ms per iteration after ``--warmup`` iterations, tokens/s per device, the ratio to the homogeneous run,
the encoders' mean imbalance (max/mean work over the ranks sharing a micro-batch) and the last loss.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import omni_step  # noqa: E402  (the 7B-width thinker config)
from train_inputs import TINY_IDS  # noqa: E402

# (image sides in pixels, audio seconds) per row kind; rows cycle through them
ROW_KINDS = [([896], 30.0), ([224, 224, 224, 224], 10.0), ([448, 448], 20.0), ([112], 2.0)]
SMOKE_KINDS = [([112], 3.0), ([28, 28, 28, 28], 1.0), ([56, 56], 2.0), ([28], 0.5)]


def write_inputs(out: Path, rows: int, tp: int, smoke: bool) -> None:
    """Media, processor, data.json and the two model.json files (rank 0; the others wait for ``ready``)."""
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config
    from tests.fixtures.tokenizer import CORPUS as _CORPUS
    from tests.fixtures.qwen2_5_omni import build_tiny_processor, tiny_data_config
    from tests.fixtures.media import write_dataset, write_image, write_wav

    kinds = SMOKE_KINDS if smoke else ROW_KINDS
    media = out / "media"
    media.mkdir(parents=True, exist_ok=True)
    sides = sorted({s for sizes, _ in kinds for s in sizes})
    for s in sides:
        write_image(media / f"img{s}.png", s, s, seed=s)
    for _, sec in kinds:
        write_wav(media / f"aud{sec:g}.wav", seconds=sec, freq=220.0 + 10 * sec)
    build_tiny_processor(out / "processor", image_max_pixels=max(sides) ** 2)
    answer = _CORPUS[:400]
    data_rows = []
    for i in range(rows):
        sizes, sec = kinds[i % len(kinds)]
        prompt = "<image>" * len(sizes) + "<audio>Describe what you see and hear."
        data_rows.append({"messages": [{"role": "user", "content": prompt},
                                       {"role": "assistant", "content": answer}],
                          "images": [f"img{s}.png" for s in sizes], "audios": [f"aud{sec:g}.wav"]})
    data = tiny_data_config(out / "processor", media, write_dataset(out / "rows.json", data_rows),
                            cache_dir=str(out / "cache"))
    pre = data["dataset_param"]["preprocess_parameters"]
    pre.update(image_max_pixels=max(sides) ** 2, image_min_pixels=min(sides) ** 2)
    (out / "data.json").write_text(json.dumps(data, indent=1))

    omni_step.IDS.update(TINY_IDS)
    cfg = omni_step.thinker_config()
    model = from_hf_thinker_config(cfg)
    if not smoke:
        for module in (model.text_decoder, model.image_encoder.vision_encoder, model.image_encoder.vision_projector,
                       model.audio_encoder.audio_encoder):
            module.bf16 = True
    (out / "model.json").write_text(model.model_dump_json(indent=1))
    model.text_decoder.tp = tp  # MindSpeed-MM's hetero keys: the decoder at TP, the encoders whole (tp 1)
    model.image_encoder.tp = model.audio_encoder.tp = 1
    (out / "model_hetero.json").write_text(model.model_dump_json(indent=1))
    (out / "ready").write_text("ok")


class ImbalanceLog(logging.Handler):
    """Collects the running mean imbalance that mm_omni.parallel.encoder_split logs per encoder call."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.last: dict[str, float] = {}

    def emit(self, record):
        msg = record.getMessage()
        if "imbalance max/mean" in msg:
            kind = msg.split()[1]
            self.last[kind] = float(msg.split("running mean ")[1].split(",")[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=2, help="the decoder's tensor-parallel size")
    parser.add_argument("--mbs", type=int, default=4, help="micro-batch size (rows per TP group per micro-batch)")
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny widths, fp32, CPU gloo: checks the script")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world < 2 or world % args.tp:
        raise SystemExit(f"bench/hetero.py needs torchrun with >= 2 processes and --tp dividing them (got {world}, "
                         f"--tp {args.tp})")
    if args.smoke:
        os.environ["MM_OMNI_DEVICE"] = "cpu"
        omni_step.TEXT.update(hidden=64, ffn=128, heads=4, groups=2, mrope=[2, 3, 3])
        omni_step.VISION.update(hidden=32, ffn=48, heads=2)
        omni_step.AUDIO.update(hidden=32, ffn=64, heads=4)
    out = Path(args.out)
    dp = world // args.tp
    gbs = dp * args.mbs
    rows = gbs * args.iters
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "ready").unlink(missing_ok=True)
        write_inputs(out, rows, args.tp, args.smoke)
    while not (out / "ready").exists():
        time.sleep(0.5)

    from mm_omni.train import main as train_main

    handler = ImbalanceLog()
    split_log = logging.getLogger("mm_omni.parallel.encoder_split")
    split_log.addHandler(handler)
    split_log.setLevel(logging.DEBUG)
    flags = ["--mm-data", str(out / "data.json"), "--train-iters", str(args.iters), "--lr", "1e-5",
             "--lr-decay-style", "constant", "--micro-batch-size", str(args.mbs), "--global-batch-size", str(gbs),
             "--log-interval", "1", "--num-workers", "2", "--use-distributed-optimizer", "--seq-length", "4096",
             "--seed", "42"] + ([] if args.smoke else ["--bf16"])
    runs = {
        "homogeneous": ["--mm-model", str(out / "model.json"), "--tensor-model-parallel-size", str(args.tp)],
        "hetero (count)": ["--mm-model", str(out / "model_hetero.json"), "--hetero-parallel",
                           "--hetero-encoder-balance", "count"],
        "hetero (cost)": ["--mm-model", str(out / "model_hetero.json"), "--hetero-parallel"],
    }
    results = {}
    for name, extra in runs.items():
        handler.last = {}
        res = train_main(flags + extra, keep_process_group=True)
        measured = [res.iteration_ms[i] for i in sorted(res.iteration_ms) if i > args.warmup]
        tokens = [res.iteration_tokens[i] for i in sorted(res.iteration_tokens) if i > args.warmup]
        ms = statistics.median(measured)
        results[name] = dict(ms=ms, tps=statistics.mean(tokens) / (ms / 1e3) / world,
                             loss=res.losses.get(max(res.losses)) if res.losses else None,
                             imbalance=dict(handler.last))
    import torch.distributed as dist

    # the logging rank (the last) has the losses; send its table through rank 0's order of printing
    if rank == world - 1:
        base = results["homogeneous"]
        import torch

        print(f"\nhetero bench: {world} processes ({'CPU smoke' if args.smoke else torch.cuda.get_device_name()}), "
              f"decoder TP {args.tp} x DP {dp}, MBS {args.mbs}, GBS {gbs}, {args.iters} iterations "
              f"(median of the last {args.iters - args.warmup}); rows cycle {SMOKE_KINDS if args.smoke else ROW_KINDS}")
        print(f"  {'layout':16s} {'ms/iter':>9s} {'tokens/s/dev':>13s} {'vs homog.':>10s} "
              f"{'imbalance vision/audio':>23s} {'last loss':>10s}")
        for name, r in results.items():
            imb = r["imbalance"]
            imb_s = (f"{imb.get('image_encoder', float('nan')):.3f} / {imb.get('audio_encoder', float('nan')):.3f}"
                     if imb else "-")
            print(f"  {name:16s} {r['ms']:9.1f} {r['tps']:13.0f} {base['ms'] / r['ms']:9.2f}x {imb_s:>23s} "
                  f"{r['loss'] if r['loss'] is None else round(r['loss'], 5)!s:>10s}")
        print(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
