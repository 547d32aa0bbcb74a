"""Launcher flags: MindSpeed-MM's script parses, unknown flags and bad combinations fail fast."""

from __future__ import annotations

import logging

import pytest

from mm_omni.cli import main as cli_main
from mm_omni.config.arguments import ArgumentsError, log_accepted_flags, parse_args, validate_args
from mm_omni.train import prepare_args

# Every flag of MindSpeed-MM's examples/qwen2.5omni/finetune_qwen2_5_omni_7b.sh, as MindSpeed-MM writes them.
MINDSPEED_MM_7B = """
--use-mcore-models --tensor-model-parallel-size 1 --pipeline-model-parallel-size 2 --micro-batch-size 1
--global-batch-size 192 --context-parallel-size 1 --tokenizer-type NullTokenizer --vocab-size 152064
--seq-length 3072 --make-vocab-size-divisible-by 1 --normalization RMSNorm --use-fused-rmsnorm --swiglu
--use-fused-swiglu --no-masked-softmax-fusion --lr 1.0e-5 --lr-decay-style cosine --weight-decay 0
--train-iters 10000 --lr-warmup-fraction 0.1 --clip-grad 0.0 --adam-beta1 0.9 --adam-beta2 0.999
--no-gradient-accumulation-fusion --seed 42 --bf16 --load ckpt/mm_path/Qwen2.5-VL-Omni-7B
--variable-seq-lengths --use-distributed-optimizer --no-load-optim --no-load-rng --no-save-optim
--no-save-rng --num-workers 2 --distributed-timeout-minutes 600 --use-flash-attn
--mm-data ./examples/qwen2.5omni/data_7b.json --mm-model ./examples/qwen2.5omni/model_7b.json
--mm-tool ./mindspeed_mm/tools/tools.json --log-interval 1 --save-interval 10000 --eval-interval 10000
--eval-iters 5000 --save save_dir --ckpt-format torch --log-tps --distributed-backend nccl
""".split()
OPTIONAL = ["--hetero-encoder-mbs-scale", "1", "--enable-dummy-optimizer", "--calculate-per-token-loss"]
BASE = ["--train-iters", "10", "--lr", "1e-5"]


def test_mindspeed_mm_launcher_flags_parse_and_validate(caplog):
    args = parse_args(MINDSPEED_MM_7B + OPTIONAL)
    validate_args(args, world_size=8)  # NPUS_PER_NODE=8
    assert (args.data_parallel_size, args.num_microbatches) == (4, 48)  # DP 4, GBS 192 = 1 x 48 x 4
    assert args.bf16 and args.use_distributed_optimizer and args.no_load_optim and args.log_tps
    assert args.lr_warmup_fraction == 0.1 and args.clip_grad == 0.0 and args.seq_length == 3072
    with caplog.at_level(logging.INFO, logger="mm_omni.config.arguments"):
        log_accepted_flags(args)
    for flag in ("--use-fused-rmsnorm", "--use-flash-attn", "--no-masked-softmax-fusion", "--use-fused-swiglu",
                 "--use-mcore-models", "--no-gradient-accumulation-fusion", "--swiglu", "--vocab-size"):
        assert sum(flag + " accepted" in m for m in caplog.messages) == 1, flag


def test_mindspeed_mm_flags_parse():
    args = parse_args(BASE + [
        "--num-layers-per-virtual-pipeline-stage", "1", "--sequence-parallel", "--min-lr", "1e-6",
        "--lr-warmup-iters", "2", "--fp16", "--finetune", "--tensorboard-dir", "tb", "--recompute-granularity",
        "full", "--recompute-method", "uniform", "--recompute-num-layers", "1", "--hetero-parallel",
        "--calculate-per-sample-loss", "--lora-target-modules", "linear_qkv", "linear_proj", "--lora-r", "8",
        "--lora-alpha", "16", "--lora-dropout", "0.05"])
    assert args.lora_target_modules == ["linear_qkv", "linear_proj"] and args.recompute_num_layers == 1


def test_unknown_flag_is_an_error_naming_it():
    with pytest.raises(ArgumentsError, match="--use-magic-kernel"):
        parse_args(BASE + ["--use-magic-kernel"])


@pytest.mark.parametrize("flags,world,match", [
    (["--tensor-model-parallel-size", "2"], 3, r"--tensor-model-parallel-size.*world size 3"),
    (["--micro-batch-size", "4", "--global-batch-size", "6"], 1, r"--global-batch-size=6.*divisible"),
    (["--global-batch-size", "6"], 4, r"--global-batch-size=6.*1x4"),
    (["--bf16", "--fp16"], 1, r"--bf16 --fp16"),
    (["--calculate-per-token-loss", "--calculate-per-sample-loss"], 1, "pick one loss mode"),
    (["--context-parallel-size", "2"], 3, r"--context-parallel-size=1x1x2: the world size 3"),
    (["--ckpt-format", "torch_dist"], 1, "--ckpt-format=torch_dist"),
    (["--min-lr", "1"], 1, "--min-lr=1.0"),
    (["--hetero-parallel", "--tensor-model-parallel-size", "2"], 2, "--hetero-parallel"),
    (["--peak-tflops", "0"], 1, r"--peak-tflops=0.0: give the device's dense bf16/fp16 peak"),
    (["--hetero-encoder-balance", "rows"], 1, r"--hetero-encoder-balance.*invalid choice"),
    (["--encoder-cuda-graphs"], 1, r"--encoder-cuda-graphs=True: CUDA graphs need a CUDA GPU and this run is on cpu"),
])
def test_bad_combinations_fail_before_any_model(flags, world, match):
    with pytest.raises(ArgumentsError, match=match):
        validate_args(parse_args(BASE + flags), world_size=world)


def test_missing_lr_names_the_flag():
    with pytest.raises(ArgumentsError, match="--lr"):
        validate_args(parse_args(["--train-iters", "1"]), world_size=1)


def test_structure_flags_never_override_model_json(caplog, thinker_config):
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config

    cfg = from_hf_thinker_config(thinker_config)
    args = parse_args(BASE + ["--hidden-size", "3584", "--num-layers", str(cfg.text_decoder.num_layers)])
    with caplog.at_level(logging.INFO, logger="mm_omni.config.arguments"):
        log_accepted_flags(args, cfg)
    assert any("--hidden-size=3584 disagrees" in m and "model.json wins" in m for m in caplog.messages)
    assert not any("--num-layers" in m for m in caplog.messages)


def test_tensorboard_missing_is_a_clear_error():
    # tensorboard is not installed in this venv; where it is, the flag just works
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="--tensorboard-dir tb: tensorboard is not installed"):
            prepare_args(BASE + ["--tensorboard-dir", "tb"])
    else:
        prepare_args(BASE + ["--tensorboard-dir", "tb"])


def test_cli_train_is_the_same_entry(capsys):
    with pytest.raises(SystemExit) as err:
        cli_main(["train", "--train-iters", "1", "--lr", "1e-5", "--not-a-flag"])
    assert err.value.code == 2
    assert "--not-a-flag" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown command 'fit'"):
        cli_main(["fit"])
