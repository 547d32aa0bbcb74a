"""The launchers in examples/qwen3omni: the full and LoRA scripts' flags parse and validate (expert parallel,
recompute, LoRA), the torchrun line is multi-node, and the example model/data JSONs load as the Qwen3-Omni family
with the released sizes. The scripts run under bash with a stub ``torchrun`` that records its arguments: nothing
is trained, no model is built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mm_omni.train import prepare_args
from tests.unit.training.test_launchers import STUB, split

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples" / "qwen3omni"


def launch(tmp_path: Path, script: str, **env) -> list[str]:
    import os
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "torchrun").write_text(STUB)
    (bin_dir / "torchrun").chmod(0o755)
    out = tmp_path / "torchrun_args.json"
    full_env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TORCHRUN_ARGS_OUT=str(out),
                    ASCEND_SET_ENV=str(tmp_path / "no_set_env.sh"), **env)
    subprocess.run(["bash", str(EXAMPLES / script)], cwd=tmp_path, env=full_env, check=True, capture_output=True,
                   timeout=60)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def launch_root(tmp_path_factory) -> Path:
    """The repository root as the launchers see it, with a tiny processor at the released tokenizer's ids and a
    config.json (position_id_per_seconds) where data_30b_a3b.json points."""
    from tests.fixtures.qwen3_omni_moe import QWEN3_OMNI_SPECIAL_TOKENS, build_tiny_qwen3_omni_processor

    root = tmp_path_factory.mktemp("q3_launch_root")
    (root / "examples").symlink_to(REPO / "examples")
    hf = root / "ckpt" / "hf_path" / "Qwen3-Omni-30B-A3B-Instruct"
    build_tiny_qwen3_omni_processor(hf, special_tokens=QWEN3_OMNI_SPECIAL_TOKENS)
    (hf / "config.json").write_text(json.dumps({"model_type": "qwen3_omni_moe", "thinker_config": {
        "model_type": "qwen3_omni_moe_thinker", "position_id_per_seconds": 13, "audio_config": {"n_window": 50}}}))
    return root


@pytest.mark.parametrize("script,gpus,ep,lora", [("finetune_qwen3_omni_30b_a3b.sh", 8, 8, False),
                                                 ("finetune_qwen3_omni_30b_a3b_lora.sh", 4, 4, True)])
def test_launcher_flags_parse_and_validate(tmp_path, launch_root, monkeypatch, script, gpus, ep, lora):
    torchrun, flags = split(launch(tmp_path, script))
    assert torchrun == {"--nproc_per_node": str(gpus), "--nnodes": "1", "--node_rank": "0",
                        "--master_addr": "localhost", "--master_port": "6000"}
    monkeypatch.chdir(launch_root)
    monkeypatch.setenv("WORLD_SIZE", str(gpus))
    args, model_cfg = prepare_args(flags)
    assert args.model_family == "qwen3_omni_moe"
    assert (args.expert_model_parallel_size, args.tensor_model_parallel_size, args.data_parallel_size) == (ep, 1, gpus)
    assert args.global_batch_size == 4 * gpus and args.seq_length == 8192
    # the released tokenizer's ids, stated in model.json and checked against the tokenizer at start-up
    assert (model_cfg.audio_token_id, model_cfg.audio_start_token_id, model_cfg.audio_end_token_id,
            model_cfg.image_token_id, model_cfg.video_token_id) == (151675, 151669, 151670, 151655, 151656)
    if lora:
        assert args.lora_target_modules == ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"] and args.lora_r == 8 and args.lr == 1e-4
        assert args.recompute_granularity is None
    else:
        assert not getattr(args, "lora_target_modules", None) and args.lr == 1e-5
        assert (args.recompute_granularity, args.recompute_method, args.recompute_num_layers) == ("full", "uniform", 1)


def test_launcher_multi_node_and_tensor_parallel(tmp_path, launch_root, monkeypatch):
    torchrun, flags = split(launch(tmp_path, "finetune_qwen3_omni_30b_a3b.sh", GPUS_PER_NODE="8", NNODES="2",
                                   NODE_RANK="1", MASTER_ADDR="10.0.0.1", TP="2", EP="8"))
    assert torchrun["--nnodes"] == "2" and torchrun["--node_rank"] == "1" and torchrun["--master_addr"] == "10.0.0.1"
    assert "--sequence-parallel" in flags  # MoE at TP > 1 needs the sequence split
    monkeypatch.chdir(launch_root)
    monkeypatch.setenv("WORLD_SIZE", "16")
    args, _ = prepare_args(flags)
    assert (args.tensor_model_parallel_size, args.expert_model_parallel_size, args.data_parallel_size) == (2, 8, 8)


def test_example_jsons_are_the_released_model():
    from mm_omni.config.data import load_data_config
    from mm_omni.registry import load_model_config

    family, cfg = load_model_config(EXAMPLES / "model_30b_a3b.json")
    text, vit, aut = cfg.text_decoder, cfg.image_encoder.vision_encoder, cfg.audio_encoder.audio_encoder
    assert family.name == "qwen3_omni_moe" and cfg.position_id_per_seconds == 13
    assert (text.num_layers, text.hidden_size, text.num_attention_heads, text.num_query_groups, text.head_dim,
            text.vocab_size) == (48, 2048, 32, 4, 128, 152064)
    assert (text.num_moe_experts, text.moe_router_topk, text.moe_ffn_hidden_size, text.moe_layer_freq,
            text.moe_router_pre_softmax, text.mrope_section, text.mrope_interleaved, text.qk_layernorm) == (
                128, 8, 768, [1] * 48, False, [24, 20, 20], True, True)
    assert (vit.num_layers, vit.hidden_size, vit.ffn_hidden_size, vit.patch_size, vit.deepstack_visual_indexes) == (
        27, 1152, 4304, 16, [8, 16, 24])
    assert (aut.num_layers, aut.d_model, aut.ffn_hidden_size, aut.num_mel_bins, aut.n_window) == (32, 1280, 5120, 128, 50)
    data = load_data_config(EXAMPLES / "data_30b_a3b.json")
    assert data.dataset_param.basic_parameters.template == "qwen3_omni" and data.dataloader_param.packing
