"""Inputs for a ``mm_omni.train`` speed run at Qwen2.5-Omni 7B widths (random init; nothing downloaded).

Writes into ``--out``: the tiny processor (``tests.fixtures``), 448x448 images and 10 s WAVs, a
dataset of image + audio + long-text rows, ``data.json`` (pixel caps raised to 448x448, so an image
is 256 merged tokens) and ``model.json`` at 7B widths whose special token ids are the tiny
processor's. ``--depth reduced`` is the benchmarks' depth (text 4, vision 8, audio 8); ``full`` is the
7B's (28 / 32 / 32, vision full attention every 8th layer).

    python bench/train_inputs.py --out /tmp/run --depth reduced
    python bench/train_inputs.py --out /tmp/long --depth full --long-video 120 --rows 4   # ~32.0k-token rows
    torchrun --nproc_per_node 1 -m mm_omni.train --mm-model /tmp/run/model.json --mm-data /tmp/run/data.json \
        --seq-length 4096 --micro-batch-size 1 --global-batch-size 1 --train-iters 20 --bf16 --log-tps ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import omni_step  # noqa: E402  (bench/omni_step.py: the 7B-width thinker config)

TINY_IDS = dict(image_token_index=1000, video_token_index=1001, audio_token_index=1002,
                vision_start_token_id=1003, vision_end_token_id=1004, audio_start_token_id=1005,
                audio_end_token_id=1006)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--depth", choices=("reduced", "full"), default="reduced")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--text-chars", type=int, default=6000, help="assistant answer length per row")
    parser.add_argument("--long-video", type=float, default=0.0, metavar="SECONDS",
                        help="instead: rows of one 448x448 video of this length at 2 fps with its audio track "
                             "(use_audio_in_video; the feature extractor keeps its first 30 s of audio): 120 s is ~32.0k "
                             "tokens, the row of the context-parallel memory run")
    args = parser.parse_args()
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config
    from tests.fixtures.tokenizer import CORPUS as _CORPUS
    from tests.fixtures.qwen2_5_omni import build_tiny_processor, tiny_data_config
    from tests.fixtures.media import write_dataset, write_image, write_video, write_wav

    out = Path(args.out)
    media = out / "media"
    media.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        write_image(media / f"img{i}.png", 448, 448, seed=i)
        write_wav(media / f"aud{i}.wav", seconds=10.0, freq=220.0 * (i + 1))
    build_tiny_processor(out / "processor", image_max_pixels=448 * 448)
    answer = (_CORPUS * (args.text_chars // len(_CORPUS) + 1))[: args.text_chars]
    rows = [{"messages": [{"role": "user", "content": "<image><audio>Describe the image and the audio."},
                          {"role": "assistant", "content": answer}],
             "images": [f"img{i % 4}.png"], "audios": [f"aud{i % 4}.wav"]} for i in range(args.rows)]
    if args.long_video:
        write_video(media / "long.mp4", seconds=args.long_video, fps=2, size=448)
        rows = [{"messages": [{"role": "user", "content": "<video>Describe the video and what is said."},
                              {"role": "assistant", "content": answer[:2000]}], "videos": ["long.mp4"]}
                for _ in range(args.rows)]
    data = tiny_data_config(out / "processor", media, write_dataset(out / "rows.json", rows),
                            use_audio_in_video=bool(args.long_video))
    pre = data["dataset_param"]["preprocess_parameters"]
    pre.update(image_max_pixels=448 * 448, image_min_pixels=448 * 448)
    if args.long_video:
        pre.update(video_max_pixels=448 * 448, video_min_pixels=448 * 448, video_maxlen=int(2 * args.long_video) + 2)
    (out / "data.json").write_text(json.dumps(data, indent=1))

    omni_step.IDS.update(TINY_IDS)
    if args.depth == "full":
        omni_step.TEXT.update(layers=28)
        omni_step.VISION.update(layers=32)
        omni_step.AUDIO.update(layers=32)
    cfg = omni_step.thinker_config()
    if args.depth == "full":
        cfg.vision_config.fullatt_block_indexes = [7, 15, 23, 31]
    model = from_hf_thinker_config(cfg)
    for module in (model.text_decoder, model.image_encoder.vision_encoder, model.image_encoder.vision_projector,
                   model.audio_encoder.audio_encoder):
        module.bf16 = True
    (out / "model.json").write_text(model.model_dump_json(indent=1))
    print(f"wrote {out}: {len(rows)} rows, depth {args.depth}")


if __name__ == "__main__":
    main()
