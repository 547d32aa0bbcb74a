"""``--hetero-parallel``'s checks of model.json's per-module sizes, before any model or process group exists.

The text decoder runs megatron's TP/PP/CP with ``text_decoder.tp/pp/cp`` (put into the parsed flags
here); each encoder block runs pure data parallel (``tp: 1``) or follows the decoder's TP group
(``tp`` = the decoder's). The runtime side (groups, the media split, the gradient sums) is
:mod:`mm_omni.parallel.hetero`.
"""

from __future__ import annotations

import argparse
import math

from mm_omni.config.encoder_blocks import encoder_blocks
from mm_omni.config.errors import ArgumentsError


def _fail(key: str, value, fix: str) -> None:
    raise ArgumentsError(f"{key}={value}: {fix}")


def resolve_layout(args: argparse.Namespace, model_cfg, world_size: int) -> None:
    """Check the hetero layout and put the decoder's sizes into ``args`` (before any model exists)."""
    if model_cfg is None:
        _fail("--hetero-parallel", True, "the per-module sizes come from model.json: also give --mm-model")
    sizes = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size)
    if sizes != (1, 1, 1):
        _fail("--hetero-parallel", True, f"the launcher's TP, PP and CP must all be 1 (got {sizes}): the sizes "
              "come from model.json (text_decoder.tp/pp/cp); set TP=1 PP=1 CP=1 in the script")
    if args.hetero_encoder_mbs_scale != 1:
        _fail("--hetero-encoder-mbs-scale", args.hetero_encoder_mbs_scale,
              "the encoders here encode each decoder micro-batch's media, split across its TP group; "
              "leave it at 1")
    text = model_cfg.text_decoder
    blocks = encoder_blocks(model_cfg)
    for key, block in blocks.items():
        if block.pp != 1 or block.cp != 1:
            _fail(f"{key}.pp/cp", f"{block.pp}/{block.cp}", "an encoder runs whole on each rank (no PP, no "
                  "CP: its sequences are short); set both to 1 (tp: 1 spreads it over all ranks)")
        if block.tp not in (1, text.tp):
            _fail(f"{key}.tp", block.tp, f"an encoder runs pure data parallel (tp: 1) or follows the decoder's "
                  f"TP group (tp: text_decoder.tp = {text.tp}); set it to 1 or {text.tp}")
    split = [key for key, block in blocks.items() if block.tp == 1 and text.tp * text.cp * text.pp > 1]
    if split and getattr(args, "lora_target_modules", None):
        _check_lora_targets(args.lora_target_modules, split)
    args.tensor_model_parallel_size, args.pipeline_model_parallel_size = text.tp, text.pp
    args.context_parallel_size = text.cp


def _check_lora_targets(values, split: list[str]) -> None:
    """LoRA adapters are added after the model is built, so they miss the tp=1 encoders' replication."""
    from mm_omni.lora.targets import LoraTargetError, parse_targets

    try:
        targets = parse_targets(values)
    except LoraTargetError:
        return  # the LoRA checks report it
    for t in targets:
        if not t.path.startswith("text_decoder"):
            _fail("--lora-target-modules", t.text, f"with --hetero-parallel, LoRA on the tp=1 encoders "
                  f"({', '.join(split)}) is not supported yet; target the decoder only, e.g. "
                  f"text_decoder.{t.text.rpartition('.')[2]}")


def check_batch(args: argparse.Namespace, model_cfg, world_size: int) -> None:
    """MindSpeed-MM's rule: the decoder's DP x MBS must be divisible by every encoder's DP (world / its tp)."""
    for key, block in encoder_blocks(model_cfg).items():
        enc_dp = world_size // block.tp
        if (args.data_parallel_size * args.micro_batch_size) % enc_dp:
            _fail("--micro-batch-size", args.micro_batch_size,
                  f"with --hetero-parallel the decoder's DP x MBS = {args.data_parallel_size} x "
                  f"{args.micro_batch_size} must be divisible by {key}'s DP = world {world_size} / {key}.tp "
                  f"{block.tp} = {enc_dp} (so every encoder rank gets an equal share); raise --micro-batch-size "
                  f"to a multiple of {enc_dp // math.gcd(enc_dp, args.data_parallel_size)}")
