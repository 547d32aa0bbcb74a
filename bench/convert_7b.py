"""Converter benchmark: a random Qwen2.5-Omni checkpoint with the real 7B names and shapes
(thinker + talker + token2wav, bf16, sharded safetensors), hf_to_mm at TP2/PP4 and back.

Prints wall time and peak RSS of each direction (each runs in its own process) and checks the round
trip on a sample of tensors. ``--scale`` keeps that fraction of every stack's layers (widths stay
real, so per-tensor sizes are the 7B's); ``--width-div`` also divides the widths, for a smoke run.
The full model (``--scale 1``) needs ~20 GB per copy, three copies (HF, MM, HF back): ~60 GB disk.

    python bench/convert_7b.py --scale 0.25 --workdir /tmp/convert_bench
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("convert_7b")
ROOT = Path(__file__).resolve().parents[1]


def omni_config(scale: float, div: int):
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniConfig

    def layers(n, least=1):
        return max(least, round(n * scale))

    def up8(n):
        return 8 * math.ceil(n / div / 8)

    text_hidden = 28 * (128 // div)
    text = dict(vocab_size=up8(152064), hidden_size=text_hidden, intermediate_size=up8(18944),
                num_hidden_layers=layers(28, 4), num_attention_heads=28, num_key_value_heads=4,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                tie_word_embeddings=False)
    vision = dict(depth=layers(32), hidden_size=16 * (80 // div), intermediate_size=up8(3420), num_heads=16,
                  out_hidden_size=text_hidden, fullatt_block_indexes=[7, 15, 23, 31])
    audio = dict(encoder_layers=layers(32), d_model=20 * (64 // div), encoder_attention_heads=20,
                 encoder_ffn_dim=up8(5120), output_dim=text_hidden)
    talker = dict(vocab_size=8448, embedding_size=text_hidden, hidden_size=12 * (64 // div),
                  intermediate_size=up8(4864), num_hidden_layers=layers(24), num_attention_heads=12,
                  num_key_value_heads=4, head_dim=64 // div,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    thinker = dict(text_config=text, vision_config=vision, audio_config=audio, tie_word_embeddings=False)
    return Qwen2_5OmniConfig(thinker_config=thinker, talker_config=talker, enable_audio_output=True)


def make_checkpoint(path: Path, scale: float, div: int, shard_bytes: int = 4 << 30) -> None:
    """Random bf16 tensors under the names save_pretrained writes (thinker keys in hub spelling)."""
    from safetensors.torch import save_file
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniForConditionalGeneration

    from mm_omni.models.qwen2_5_omni.hf_mapping import NAMES

    cfg = omni_config(scale, div)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Qwen2_5OmniForConditionalGeneration(cfg).state_dict().items()}
    names = {}
    for key in shapes:
        pre, local = NAMES.split_prefix(key)
        names[key] = NAMES.from_canonical(NAMES.to_canonical(local), "hub", pre) if pre else key
    path.mkdir(parents=True)
    cfg.save_pretrained(path)
    shards, current, size = [], {}, 0
    for key, shape in shapes.items():
        current[names[key]] = shape
        size += math.prod(shape) * 2
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    shards.append(current)
    weight_map, total = {}, 0
    gen = torch.Generator().manual_seed(0)
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shard.items()}
        save_file(tensors, path / file, metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({k: file for k in tensors})
        del tensors
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    log.info("random checkpoint: %.2f GB in %d shards", total / 1e9, len(shards))


def layout_args(thinker) -> list[str]:
    """TP2 / PP4: encoders and one text layer on stage 0, the rest spread (MindSpeed's 7B example)."""
    n = thinker.text_config.num_hidden_layers
    rest = [(n - 1) // 3 + (i < (n - 1) % 3) for i in range(3)]
    pc = "--cfg.parallel_config."
    return [pc + "llm_pp_layers", json.dumps([[1, *rest]]),
            pc + "vit_pp_layers", json.dumps([[thinker.vision_config.depth, 0, 0, 0]]),
            pc + "audio_pp_layers", json.dumps([[thinker.audio_config.encoder_layers, 0, 0, 0]]),
            pc + "tp_size", "2"]


def run_child(argv: list[str]) -> dict:
    """One conversion in a fresh process: wall time and that process's peak RSS.

    Peak RSS is the kernel's VmHWM of the child's own address space: ``ru_maxrss`` would also count
    the pages the child shared with this (large) process between fork and exec.
    """
    code = ("import json, re, sys, time; sys.path.insert(0, %r); from converters.cli import main; "
            "t = time.perf_counter(); main(sys.argv[1:]); "
            "hwm = int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)); "
            "print(json.dumps({'wall_s': time.perf_counter() - t, 'peak_rss_gb': hwm / 2**20}))") % str(ROOT)
    out = subprocess.run([sys.executable, "-c", code, *argv], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def spot_check(a: Path, b: Path, every: int = 25) -> int:
    from safetensors import safe_open

    index = json.loads((a / "model.safetensors.index.json").read_text())["weight_map"]
    checked = 0
    for i, (key, file) in enumerate(index.items()):
        if i % every:
            continue
        with safe_open(a / file, "pt") as fa, safe_open(b / file, "pt") as fb:
            if not torch.equal(fa.get_tensor(key), fb.get_tensor(key)):
                raise AssertionError(f"{key} differs after the round trip")
        checked += 1
    return checked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of layers kept (1 = the real 7B)")
    parser.add_argument("--width-div", type=int, default=1, help="divide widths by this (smoke runs)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/convert_7b_bench"))
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sys.path.insert(0, str(ROOT))
    shutil.rmtree(args.workdir, ignore_errors=True)
    hf, mm, back = args.workdir / "hf", args.workdir / "mm", args.workdir / "hf_back"
    t = time.perf_counter()
    make_checkpoint(hf, args.scale, args.width_div)
    log.info("made the random checkpoint in %.1fs", time.perf_counter() - t)
    thinker = omni_config(args.scale, args.width_div).thinker_config
    to_mm = run_child(["Qwen2_5_OmniConverter", "hf_to_mm", "--cfg.mm_dir", str(mm), "--cfg.hf_config.hf_dir",
                       str(hf), *layout_args(thinker)])
    to_hf = run_child(["Qwen2_5_OmniConverter", "mm_to_hf", "--cfg.mm_dir", str(mm), "--cfg.hf_config.hf_dir",
                       str(hf), "--cfg.save_hf_dir", str(back)])
    checked = spot_check(hf, back)
    size = json.loads((hf / "model.safetensors.index.json").read_text())["metadata"]["total_size"] / 1e9
    print(json.dumps({"scale": args.scale, "width_div": args.width_div, "hf_checkpoint_gb": round(size, 2),
                      "hf_to_mm_tp2_pp4": to_mm, "mm_to_hf": to_hf, "tensors_spot_checked": checked,
                      "bench_process_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
