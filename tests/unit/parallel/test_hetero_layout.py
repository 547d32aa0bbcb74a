"""``--hetero-parallel``: the cost balancer, and the layout checks that fail before any model is built."""

from __future__ import annotations

import itertools
import random

import pytest

from mm_omni.config.arguments import ArgumentsError, parse_args, validate_args
from mm_omni.parallel.balance import imbalance, lpt_assign, rank_loads

BASE = ["--train-iters", "3", "--lr", "1e-5", "--hetero-parallel"]


def test_lpt_balances_by_cost_and_keeps_item_order():
    costs = [7, 5, 4, 3, 1]  # 7 | 5 4 | 3 -> rank 0 (7 < 9) | 1 -> rank 1 (9 < 10)
    owners = lpt_assign(costs, 2)
    assert owners == [0, 1, 1, 0, 1]
    assert rank_loads(costs, owners, 2) == [10, 10] and imbalance(costs, owners, 2) == 1.0


def test_lpt_edge_cases_are_deterministic():
    assert lpt_assign([], 3) == []
    assert lpt_assign([4, 4, 4, 4], 2) == [0, 1, 0, 1]  # ties: lower item first, to the lower rank
    assert lpt_assign([9, 1], 1) == [0, 0]
    one = lpt_assign([16], 2)  # fewer items than ranks: a rank gets nothing (it runs a dummy forward)
    assert one == [0] and imbalance([16], one, 2) == 2.0
    assert imbalance([0, 0], [0, 1], 2) == 1.0
    with pytest.raises(ValueError, match="n_ranks=0"):
        lpt_assign([1], 0)


@pytest.mark.parametrize("seed", range(20))
def test_lpt_within_grahams_bound_of_the_optimum(seed):
    rng = random.Random(seed)
    n_ranks = rng.choice([2, 3])
    costs = [rng.randint(1, 400) for _ in range(rng.randint(1, 7))]  # patches / mel frames
    best = min(max(rank_loads(costs, list(a), n_ranks))
               for a in itertools.product(range(n_ranks), repeat=len(costs)))
    got = max(rank_loads(costs, lpt_assign(costs, n_ranks), n_ranks))
    assert got <= (4 / 3 - 1 / (3 * n_ranks)) * best + 1e-9


def _model(thinker_config, **sizes):
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config

    cfg = from_hf_thinker_config(thinker_config)
    for key, value in sizes.items():
        module, field = key.split("__")
        setattr(getattr(cfg, module), field, value)
    return cfg


def test_sizes_come_from_model_json(thinker_config):
    args = validate_args(parse_args(BASE + ["--micro-batch-size", "2"]), 4, _model(thinker_config, text_decoder__tp=2))
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.data_parallel_size) == (2, 1, 2)
    args = validate_args(parse_args(BASE + ["--micro-batch-size", "4"]), 4,
                         _model(thinker_config, text_decoder__tp=2, text_decoder__pp=2, image_encoder__tp=2))
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.data_parallel_size) == (2, 2, 1)
    args = validate_args(parse_args(BASE + ["--micro-batch-size", "2"]), 4, _model(thinker_config, text_decoder__cp=2))
    assert (args.tensor_model_parallel_size, args.context_parallel_size, args.data_parallel_size) == (1, 2, 2)
    lora = ["--lora-target-modules", "text_decoder.linear_qkv"]  # decoder-only LoRA is fine
    args = validate_args(parse_args(BASE + ["--micro-batch-size", "2"] + lora), 4,
                         _model(thinker_config, text_decoder__tp=2))
    assert args.lora_target_modules == ["text_decoder.linear_qkv"]


@pytest.mark.parametrize("flags,sizes,match", [
    ([], None, r"--hetero-parallel=True: .*--mm-model"),
    (["--tensor-model-parallel-size", "2"], {}, r"--hetero-parallel=True: the launcher's TP, PP and CP must all be 1"),
    (["--hetero-encoder-mbs-scale", "2"], {}, r"--hetero-encoder-mbs-scale=2"),
    ([], {"text_decoder__tp": 2, "image_encoder__tp": 4}, r"image_encoder.tp=4: .*set it to 1 or 2"),
    ([], {"audio_encoder__pp": 2}, r"audio_encoder.pp/cp=2/1"),
    # MindSpeed-MM's rule: decoder DP x MBS = 2 x 1 must be divisible by the encoders' DP = 4 / 1
    (["--micro-batch-size", "1"], {"text_decoder__tp": 2}, r"--micro-batch-size=1: .*2 x 1 .*multiple of 2"),
    (["--micro-batch-size", "2", "--lora-target-modules", "all-linear"], {"text_decoder__tp": 2},
     r"--lora-target-modules=all-linear: .*text_decoder.all-linear"),
])
def test_unsupported_layouts_name_the_key(thinker_config, flags, sizes, match):
    cfg = None if sizes is None else _model(thinker_config, **sizes)
    with pytest.raises(ArgumentsError, match=match):
        validate_args(parse_args(BASE + flags), 4, cfg)
