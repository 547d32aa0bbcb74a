"""The launchers in examples/qwen2.5omni: every flag they pass parses and validates, and their torchrun line is
MindSpeed-MM's (multi node). The script runs under bash with a stub ``torchrun`` that records its arguments:
nothing is trained, no model is built (model.json is read and its pipeline layout checked)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from mm_omni.config.arguments import log_accepted_flags
from mm_omni.train import prepare_args
from tests.unit.training.test_arguments import MINDSPEED_MM_7B

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples" / "qwen2.5omni"
STUB = """#!/usr/bin/env python3
import json, os, sys
json.dump(sys.argv[1:], open(os.environ["TORCHRUN_ARGS_OUT"], "w"))
"""


@pytest.fixture(scope="module")
def launch_root(tmp_path_factory) -> Path:
    """A directory laid out like the repository root for the launchers' relative paths: ``examples/`` and the
    data JSONs' ``ckpt/hf_path/Qwen2.5-Omni-{7B,3B}``, a tiny processor with the released tokenizer's special
    ids (start-up reads the ids model.json omits from it and checks the ones it states)."""
    from tests.fixtures.qwen2_5_omni import QWEN_OMNI_SPECIAL_TOKENS, build_tiny_processor

    root = tmp_path_factory.mktemp("launch_root")
    (root / "examples").symlink_to(REPO / "examples")
    hf = root / "ckpt" / "hf_path"
    build_tiny_processor(hf / "Qwen2.5-Omni-7B", special_tokens=QWEN_OMNI_SPECIAL_TOKENS)
    (hf / "Qwen2.5-Omni-3B").symlink_to(hf / "Qwen2.5-Omni-7B")
    return root


def launch(tmp_path: Path, script: str, extra: tuple = (), **env) -> list[str]:
    """Run ``script`` with a recording ``torchrun`` first on PATH; return torchrun's arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "torchrun").write_text(STUB)
    (bin_dir / "torchrun").chmod(0o755)
    out = tmp_path / "torchrun_args.json"
    full_env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TORCHRUN_ARGS_OUT=str(out),
                    ASCEND_SET_ENV=str(tmp_path / "no_set_env.sh"), **env)
    subprocess.run(["bash", str(EXAMPLES / script), *extra], cwd=tmp_path, env=full_env, check=True,
                   capture_output=True, timeout=60)
    assert (tmp_path / "logs").is_dir()
    return json.loads(out.read_text())


def split(argv: list[str]) -> tuple[dict, list[str]]:
    """torchrun's own options and the flags after ``-m mm_omni.train``."""
    i = argv.index("-m")
    assert argv[i + 1] == "mm_omni.train"
    head = argv[:i]
    return {head[k]: head[k + 1] for k in range(0, len(head), 2)}, argv[i + 2:]


@pytest.mark.parametrize("size,vocab,pp_layers", [("7b", "152064", [11, 17]), ("3b", "151936", [14, 22])])
def test_launcher_flags_parse_and_validate(tmp_path, launch_root, monkeypatch, caplog, size, vocab, pp_layers):
    from mm_omni.training.omni_task import pipeline_overrides

    torchrun, flags = split(launch(tmp_path, f"finetune_qwen2_5_omni_{size}.sh"))
    assert torchrun == {"--nproc_per_node": "8", "--nnodes": "1", "--node_rank": "0", "--master_addr": "localhost",
                        "--master_port": "6000"}
    monkeypatch.chdir(launch_root)  # the launcher's paths are relative to the repository root
    monkeypatch.setenv("WORLD_SIZE", "8")
    args, model_cfg = prepare_args(flags)
    assert (model_cfg.image_token_id, model_cfg.audio_token_id, model_cfg.vision_start_token_id) == (
        151655, 151646, 151652)  # the first two read from the tokenizer, the third as model_7b.json states
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.data_parallel_size) == (1, 2, 4)
    assert (args.global_batch_size, args.num_microbatches) == (192, 48)  # MBS 1 x 48 grad-acc steps x DP 4
    assert args.mm_model.endswith(f"model_{size}.json") and args.mm_data.endswith(f"data_{size}.json")
    assert args.vocab_size == vocab and args.bf16 and args.use_distributed_optimizer and args.log_tps
    assert model_cfg.text_decoder.pipeline_num_layers == pp_layers
    pipeline_overrides(model_cfg, args.pipeline_model_parallel_size, args.vpp_size)  # the layout is one we build
    with caplog.at_level("INFO"):
        log_accepted_flags(args, model_cfg)
    assert any("--use-flash-attn accepted" in m for m in caplog.messages)
    # the launcher passes every flag of MindSpeed-MM's (the optional --mm-tool only when MM_TOOL is set)
    ours = {f for f in flags if f.startswith("--")}
    theirs = {f for f in MINDSPEED_MM_7B if f.startswith("--")} - {"--mm-tool"}
    assert theirs <= ours, sorted(theirs - ours)


def test_launcher_multi_node_and_overrides(tmp_path, launch_root, monkeypatch):
    torchrun, flags = split(launch(
        tmp_path, "finetune_qwen2_5_omni_7b.sh", GPUS_PER_NODE="4", NNODES="2", NODE_RANK="1",
        MASTER_ADDR="10.0.0.1", MASTER_PORT="29501", TP="2", PP="2", MBS="2", GRAD_ACC_STEP="3",
        LOAD_PATH="ckpt/mine", SAVE_PATH="out/mine", MM_TOOL="tools.json"))
    assert torchrun == {"--nproc_per_node": "4", "--nnodes": "2", "--node_rank": "1", "--master_addr": "10.0.0.1",
                        "--master_port": "29501"}
    monkeypatch.chdir(launch_root)
    monkeypatch.setenv("WORLD_SIZE", "8")
    args, _ = prepare_args(flags)
    assert (args.tensor_model_parallel_size, args.data_parallel_size, args.micro_batch_size) == (2, 2, 2)
    assert (args.global_batch_size, args.num_microbatches) == (12, 3)  # MBS 2 x 3 x DP 2
    assert (args.load, args.save, args.mm_tool) == ("ckpt/mine", "out/mine", "tools.json")


def test_launcher_extra_arguments_reach_the_trainer(tmp_path):
    _, flags = split(launch(tmp_path, "finetune_qwen2_5_omni_3b.sh", extra=["--train-iters", "5"]))
    assert flags[-2:] == ["--train-iters", "5"]  # given last: argparse keeps the last value
