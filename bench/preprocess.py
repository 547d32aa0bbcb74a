"""Preprocessing throughput (rows/s) of image, audio and video rows on the tiny processor.

``python bench/preprocess.py [--rows 40] [--size 448]``: encodes rows one by one in
this process (what one data worker does) and logs rows/s per modality.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: mm_omni and tests.fixtures

from mm_omni.config.data import load_data_config
from mm_omni.data.encode import RowEncoder
from mm_omni.data.formats import normalise_row
from tests.fixtures.qwen2_5_omni import build_tiny_processor, tiny_data_config
from tests.fixtures.media import write_image, write_video, write_wav

logger = logging.getLogger("bench_preprocess")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--size", type=int, default=448, help="image / video frame side in pixels")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        processor = build_tiny_processor(d / "proc", image_max_pixels=args.size * args.size)
        write_image(d / "i.png", args.size, args.size)
        write_wav(d / "a.wav", seconds=10.0)
        write_video(d / "v.mp4", seconds=8.0, fps=8, size=args.size, with_audio=True)
        raw = tiny_data_config(d / "proc", d, "unused.json")
        pp = raw["dataset_param"]["preprocess_parameters"]
        pp.update(image_max_pixels=args.size * args.size, video_max_pixels=args.size * args.size // 4)
        cases = {
            "image 448x448": ("<image>", {"images": ["i.png"]}, False),
            "audio 10 s": ("<audio>", {"audios": ["a.wav"]}, False),
            "video 8 s @2fps": ("<video>", {"videos": ["v.mp4"]}, False),
            "video+audio-in-video": ("<video>", {"videos": ["v.mp4"]}, True),
        }
        for name, (tag, media, aiv) in cases.items():
            pp["use_audio_in_video"] = aiv
            cfg = load_data_config(raw)
            enc = RowEncoder(cfg, 32768, processor=processor)
            row = {"messages": [{"role": "user", "content": tag + "Describe."},
                                {"role": "assistant", "content": "Something."}], **media}
            conv = normalise_row(row, cfg.dataset_param.attr, str(d), "bench", 0)
            enc.encode(conv)  # warm-up (lazy imports)
            t0 = time.perf_counter()
            for _ in range(args.rows):
                out = enc.encode(conv)
            dt = time.perf_counter() - t0
            logger.info("%-22s %7.1f rows/s  (%d tokens/row)", name, args.rows / dt, len(out["input_ids"]))


if __name__ == "__main__":
    main()
