"""Converter memory benchmark: a random Qwen3-Omni checkpoint with the real 30B-A3B thinker names and shapes
(text 48 MoE layers, hidden 2048, 128 experts of FFN 768, 32 query / 4 KV heads of 128, vocab 152064; vision 27
layers, hidden 1152, FFN 4304, 3 deepstack mergers; audio 32 layers, d_model 1280, FFN 5120) plus a talker, code
predictor and code2wav of the released widths, bf16 sharded safetensors with one tensor per expert (what
``save_pretrained`` writes). hf_to_mm into TP / PP / EP ranks, mm_to_hf back, resplit to EP1.

Prints wall time and peak RSS of each direction (each in its own process) against the largest HF shard and the
largest Megatron rank file, and checks the round trip on a sample of tensors. ``--fraction`` keeps that fraction
of every stack's layers (widths stay real: an expert layer is ~1.2 GB, the embedding and output layer 0.6 GB
each); the full model is ~70 GB per copy and there are four copies (HF, MM, HF back, resplit).

    python bench/convert_30b.py --fraction 0.0625 --workdir /tmp/convert_30b_bench
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

log = logging.getLogger("convert_30b")
ROOT = Path(__file__).resolve().parents[1]
TEXT_LAYERS, VISION_LAYERS, AUDIO_LAYERS = 48, 27, 32


def layers(n: int, fraction: float, least: int = 1) -> int:
    return max(least, round(n * fraction))


def omni_config(fraction: float):
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeConfig

    depth = layers(VISION_LAYERS, fraction, least=3)  # three deepstack mergers need three layers
    deepstack = sorted({min(depth - 1, round(i * depth / VISION_LAYERS)) for i in (8, 16, 24)})
    text = dict(vocab_size=152064, hidden_size=2048, intermediate_size=768,
                num_hidden_layers=layers(TEXT_LAYERS, fraction, least=2), num_attention_heads=32,
                num_key_value_heads=4, head_dim=128, moe_intermediate_size=768, num_experts=128,
                num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                max_position_embeddings=65536,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [24, 20, 20],
                                 "interleaved": True, "mrope_interleaved": True})
    vision = dict(depth=depth, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2048, num_position_embeddings=2304,
                  deepstack_visual_indexes=deepstack)
    audio = dict(encoder_layers=layers(AUDIO_LAYERS, fraction), d_model=1280, encoder_attention_heads=20,
                 encoder_ffn_dim=5120, num_mel_bins=128, output_dim=2048, downsample_hidden_size=480,
                 max_source_positions=1500)
    thinker = dict(text_config=text, vision_config=vision, audio_config=audio, position_id_per_seconds=13,
                   audio_token_id=151675, image_token_id=151655, video_token_id=151656,
                   audio_start_token_id=151669, tie_word_embeddings=False)
    talker_text = dict(vocab_size=3072, hidden_size=1024, intermediate_size=2048,
                       num_hidden_layers=layers(20, fraction), num_attention_heads=16, num_key_value_heads=2,
                       head_dim=128, moe_intermediate_size=384, shared_expert_intermediate_size=768, num_experts=128,
                       num_experts_per_tok=8,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [24, 20, 20],
                                        "interleaved": True})
    predictor = dict(vocab_size=2048, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers(5, fraction),
                     num_attention_heads=16, num_key_value_heads=8, head_dim=128, num_code_groups=16)
    talker = dict(text_config=talker_text, code_predictor_config=predictor, num_code_groups=16,
                  thinker_hidden_size=2048, accept_hidden_layer=min(18, text["num_hidden_layers"] - 1),
                  spatial_merge_size=2)
    code2wav = dict(num_hidden_layers=layers(8, fraction))
    return Qwen3OmniMoeConfig(thinker_config=thinker, talker_config=talker, code2wav_config=code2wav,
                              enable_audio_output=True)


def stored_shapes(cfg) -> dict[str, tuple]:
    """The names and shapes save_pretrained writes: hub spelling, one tensor per expert (thinker and talker)."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeForConditionalGeneration

    from mm_omni.models.qwen3_omni_moe.hf_mapping import NAMES, checkpoint_state

    with torch.device("meta"):
        state = Qwen3OmniMoeForConditionalGeneration(cfg).state_dict()
    state = checkpoint_state(cfg, dict(state))  # splits any ".mlp.experts.gate_up_proj" / "down_proj"
    out = {}
    for key, t in state.items():
        pre, local = NAMES.split_prefix(key)
        out[NAMES.from_canonical(NAMES.to_canonical(local), "hub", pre) if pre else key] = tuple(t.shape)
    return out


def make_checkpoint(path: Path, fraction: float, shard_bytes: int = 4 << 30) -> dict:
    """Random bf16 tensors under the stored names, in shards of ~``shard_bytes``; returns the shard sizes."""
    from safetensors.torch import save_file

    cfg = omni_config(fraction)
    shapes = stored_shapes(cfg)
    path.mkdir(parents=True)
    cfg.save_pretrained(path)
    shards, current, size = [], {}, 0
    for key, shape in shapes.items():
        current[key] = shape
        size += math.prod(shape) * 2
        if size >= shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map, total, sizes = {}, 0, {}
    gen = torch.Generator().manual_seed(0)
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: torch.randn(s, generator=gen, dtype=torch.bfloat16) for k, s in shard.items()}
        save_file(tensors, path / file, metadata={"format": "pt"})
        sizes[file] = sum(t.numel() * 2 for t in tensors.values())
        total += sizes[file]
        weight_map.update({k: file for k in tensors})
        del tensors
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    log.info("random checkpoint: %.2f GB in %d shards", total / 1e9, len(shards))
    return sizes


def layout_args(thinker, tp: int, pp: int, ep: int) -> list[str]:
    """Encoders and one text layer on stage 0, the other text layers spread over the other stages."""
    n = thinker.text_config.num_hidden_layers
    text = [n] if pp == 1 else [1] + [(n - 1) // (pp - 1) + (i < (n - 1) % (pp - 1)) for i in range(pp - 1)]
    pc = "--cfg.parallel_config."
    return [pc + "llm_pp_layers", json.dumps([text]),
            pc + "vit_pp_layers", json.dumps([[thinker.vision_config.depth] + [0] * (pp - 1)]),
            pc + "audio_pp_layers", json.dumps([[thinker.audio_config.encoder_layers] + [0] * (pp - 1)]),
            pc + "tp_size", str(tp), pc + "ep_size", str(ep)]


def run_child(argv: list[str]) -> dict:
    """One conversion in a fresh process: wall time and that process's peak RSS (VmHWM of its own address
    space; ``ru_maxrss`` would also count pages shared with this process between fork and exec)."""
    code = ("import json, re, sys, time; sys.path.insert(0, %r); from converters.cli import main; "
            "t = time.perf_counter(); main(sys.argv[1:]); "
            "hwm = int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)); "
            "print(json.dumps({'wall_s': round(time.perf_counter() - t, 1), 'peak_rss_gib': round(hwm / 2**20, 2)}))"
            ) % str(ROOT)
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


def largest_file_gib(root: Path, pattern: str) -> float:
    return round(max(p.stat().st_size for p in root.glob(pattern)) / 2**30, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=0.0625,
                        help="fraction of every stack's layers kept (1 = the real 30B-A3B; the default, 3 of the 48 "
                             "text layers, is ~5 GB per copy)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--ep", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/convert_30b_bench"))
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sys.path.insert(0, str(ROOT))
    shutil.rmtree(args.workdir, ignore_errors=True)
    hf, mm, back, ep1 = (args.workdir / d for d in ("hf", "mm", "hf_back", "mm_ep1"))
    t = time.perf_counter()
    shard_sizes = make_checkpoint(hf, args.fraction)
    log.info("made the random checkpoint in %.1fs", time.perf_counter() - t)
    thinker = omni_config(args.fraction).thinker_config
    common = ["--cfg.hf_config.hf_dir", str(hf)]
    to_mm = run_child(["Qwen3_OmniConverter", "hf_to_mm", "--cfg.mm_dir", str(mm), *common,
                       *layout_args(thinker, args.tp, args.pp, args.ep)])
    to_hf = run_child(["Qwen3_OmniConverter", "mm_to_hf", "--cfg.mm_dir", str(mm), *common,
                       "--cfg.save_hf_dir", str(back)])
    checked = spot_check(hf, back)
    shutil.rmtree(back)  # room for the resplit copy
    to_ep1 = run_child(["Qwen3_OmniConverter", "resplit", "--cfg.source_dir", str(mm), "--cfg.target_dir", str(ep1),
                        *[a.replace("--cfg.parallel_config.", "--cfg.target_parallel_config.")
                          for a in layout_args(thinker, 1, args.pp, 1)]])
    total = sum(shard_sizes.values())
    print(json.dumps({
        "fraction": args.fraction, "text_layers": thinker.text_config.num_hidden_layers,
        "vision_layers": thinker.vision_config.depth, "audio_layers": thinker.audio_config.encoder_layers,
        "hf_checkpoint_gib": round(total / 2**30, 2),
        "largest_hf_shard_gib": round(max(shard_sizes.values()) / 2**30, 2),
        f"largest_mm_rank_file_gib_tp{args.tp}_pp{args.pp}_ep{args.ep}": largest_file_gib(mm, "release/*/*.pt"),
        "largest_mm_rank_file_gib_ep1": largest_file_gib(ep1, "release/*/*.pt"),
        f"hf_to_mm_tp{args.tp}_pp{args.pp}_ep{args.ep}": to_mm, "mm_to_hf": to_hf,
        f"resplit_to_tp1_pp{args.pp}_ep1": to_ep1, "tensors_spot_checked": checked,
        "bench_process_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
