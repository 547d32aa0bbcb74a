"""The launchers in examples/qwen2.5vl: every flag of MindSpeed-MM's finetune_qwen2_5_vl_7b.sh is passed and
parses and validates, the torchrun line is multi-node, and the example model/data JSONs load as MindSpeed-MM
ships them (Qwen2.5-VL family, template ``qwen2vl``). The scripts run under bash with a stub ``torchrun`` that
records its arguments: nothing is trained, no model is built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mm_omni.config.arguments import log_accepted_flags
from mm_omni.train import prepare_args
from tests.unit.training.test_launchers import launch, split

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples" / "qwen2.5vl"
# the flags of MindSpeed-MM's examples/qwen2.5vl/finetune_qwen2_5_vl_7b.sh (pretrain_vlm.py's command line)
MINDSPEED_MM_VL_7B = """
--use-mcore-models --tensor-model-parallel-size 1 --pipeline-model-parallel-size 2 --context-parallel-size 1
--context-parallel-algo ulysses_cp_algo --micro-batch-size 1 --global-batch-size 192 --tokenizer-type NullTokenizer
--vocab-size 152064 --seq-length 1024 --make-vocab-size-divisible-by 1 --normalization RMSNorm --use-fused-rmsnorm
--swiglu --use-fused-swiglu --no-masked-softmax-fusion --lr 1.0e-5 --lr-decay-style cosine --weight-decay 0
--train-iters 10000 --lr-warmup-fraction 0.1 --clip-grad 0.0 --adam-beta1 0.9 --adam-beta2 0.999 --seed 42 --bf16
--load ckpt/mm_path/Qwen2.5-VL-7B-Instruct --use-flash-attn --variable-seq-lengths --use-distributed-optimizer
--no-load-optim --no-load-rng --no-save-optim --no-save-rng --num-workers 8 --distributed-timeout-minutes 20
--mm-data ./examples/qwen2.5vl/data_7b.json --mm-model ./examples/qwen2.5vl/model_7b.json
--mm-tool ./mindspeed_mm/tools/tools.json --log-interval 1 --save-interval 10000 --eval-interval 10000
--eval-iters 5000 --save save_dir --ckpt-format torch --log-tps --distributed-backend nccl
""".split()


def launch_vl(tmp_path: Path, script: str, extra: tuple = (), **env) -> list[str]:
    """test_launchers' recording run of ``examples/qwen2.5vl/<script>`` (an absolute path replaces its folder)."""
    return launch(tmp_path, str(EXAMPLES / script), extra, **env)


@pytest.fixture(scope="module")
def launch_root(tmp_path_factory) -> Path:
    """A directory laid out like the repository root for the launchers' relative paths: ``examples/`` and the data
    JSONs' ``ckpt/hf_path/Qwen2.5-VL-{7B,3B}-Instruct``, a tiny processor with the released tokenizer's special ids
    (start-up reads the ids model.json omits from it and checks the ones it states)."""
    from tests.fixtures.qwen2_5_vl import QWEN_VL_SPECIAL_TOKENS, build_tiny_vl_processor

    root = tmp_path_factory.mktemp("vl_launch_root")
    (root / "examples").symlink_to(REPO / "examples")
    hf = root / "ckpt" / "hf_path"
    build_tiny_vl_processor(hf / "Qwen2.5-VL-7B-Instruct", special_tokens=QWEN_VL_SPECIAL_TOKENS)
    (hf / "Qwen2.5-VL-3B-Instruct").symlink_to(hf / "Qwen2.5-VL-7B-Instruct")
    return root


@pytest.mark.parametrize("size,vocab,pp,pp_layers,dp", [("7b", "152064", 2, [12, 16], 4), ("3b", "151936", 1, [36], 8)])
def test_launcher_flags_parse_and_validate(tmp_path, launch_root, monkeypatch, caplog, size, vocab, pp, pp_layers, dp):
    from mm_omni.training.omni_task import pipeline_overrides

    torchrun, flags = split(launch_vl(tmp_path, f"finetune_qwen2_5_vl_{size}.sh"))
    assert torchrun == {"--nproc_per_node": "8", "--nnodes": "1", "--node_rank": "0", "--master_addr": "localhost",
                        "--master_port": "6000"}
    monkeypatch.chdir(launch_root)  # the launcher's paths are relative to the repository root
    monkeypatch.setenv("WORLD_SIZE", "8")
    args, model_cfg = prepare_args(flags)
    assert args.model_family == "qwen2_5_vl" and model_cfg.audio_encoder is None
    # image / video ids read from the tokenizer; vision_start_token_id and img_context_token_id as model_*.json state
    assert (model_cfg.image_token_id, model_cfg.video_token_id, model_cfg.vision_start_token_id,
            model_cfg.vision_end_token_id, model_cfg.img_context_token_id) == (151655, 151656, 151652, 151653, 151655)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.data_parallel_size) == (1, pp, dp)
    assert (args.global_batch_size, args.num_microbatches) == (48 * dp, 48)  # MBS 1 x 48 grad-acc steps x DP
    assert args.mm_model.endswith(f"model_{size}.json") and args.mm_data.endswith(f"data_{size}.json")
    assert args.vocab_size == vocab and args.seq_length == 1024 and args.context_parallel_algo == "ulysses_cp_algo"
    assert model_cfg.text_decoder.pipeline_num_layers == pp_layers
    pipeline_overrides(model_cfg, args.pipeline_model_parallel_size, args.vpp_size)  # the layout is one we build
    with caplog.at_level("INFO"):
        log_accepted_flags(args, model_cfg)
    assert any("--context-parallel-algo ulysses_cp_algo accepted" in m for m in caplog.messages)
    ours = {f for f in flags if f.startswith("--")}
    theirs = {f for f in MINDSPEED_MM_VL_7B if f.startswith("--")} - {"--mm-tool"}
    assert theirs <= ours, sorted(theirs - ours)


def test_launcher_multi_node_and_overrides(tmp_path, launch_root, monkeypatch):
    torchrun, flags = split(launch_vl(
        tmp_path, "finetune_qwen2_5_vl_7b.sh", GPUS_PER_NODE="4", NNODES="2", NODE_RANK="1",
        MASTER_ADDR="10.0.0.1", MASTER_PORT="29501", TP="2", PP="2", MBS="2", GRAD_ACC_STEP="3",
        LOAD_PATH="ckpt/mine", SAVE_PATH="out/mine", MM_TOOL="tools.json"))
    assert torchrun == {"--nproc_per_node": "4", "--nnodes": "2", "--node_rank": "1", "--master_addr": "10.0.0.1",
                        "--master_port": "29501"}
    monkeypatch.chdir(launch_root)
    monkeypatch.setenv("WORLD_SIZE", "8")
    args, _ = prepare_args(flags)
    assert (args.tensor_model_parallel_size, args.data_parallel_size, args.micro_batch_size) == (2, 2, 2)
    assert (args.global_batch_size, args.num_microbatches) == (12, 3)
    assert (args.load, args.save, args.mm_tool) == ("ckpt/mine", "out/mine", "tools.json")


def test_example_jsons_load_as_qwen2_5_vl(launch_root, monkeypatch):
    """MindSpeed-MM's model/data JSONs (and our 32B / 72B) load: the family, the sizes, the data template."""
    from mm_omni.config.data import load_data_config
    from mm_omni.registry import load_model_config
    from mm_omni.training.omni_task import pipeline_overrides

    monkeypatch.chdir(launch_root)
    sizes = {"3b": (36, 2048, 16, 2, 151936, False, 3420), "7b": (28, 3584, 28, 4, 152064, True, 3420),
             "32b": (64, 5120, 40, 8, 152064, True, 3456), "72b": (80, 8192, 64, 8, 152064, True, 3456)}
    for size, (layers, hidden, heads, groups, vocab, untied, vit_ffn) in sizes.items():
        family, cfg = load_model_config(EXAMPLES / f"model_{size}.json")
        text, vit = cfg.text_decoder, cfg.image_encoder.vision_encoder
        assert family.name == "qwen2_5_vl" and cfg.audio_encoder is None, size
        assert (text.num_layers, text.hidden_size, text.num_attention_heads, text.num_query_groups, text.vocab_size,
                text.untie_embeddings_and_output_weights, vit.ffn_hidden_size) == (
                    layers, hidden, heads, groups, vocab, untied, vit_ffn), size
        assert cfg.image_encoder.vision_projector.hidden_size == hidden and vit.num_layers == 32, size
        stages = len(text.pipeline_num_layers)
        pipeline_overrides(cfg, stages, None)  # each file's pipeline split is one megatron-core builds
        assert vit.pipeline_num_layers == [32] + [0] * (stages - 1), size
    for size in ("3b", "7b"):
        data = load_data_config(EXAMPLES / f"data_{size}.json")
        assert data.dataset_param.basic_parameters.template == "qwen2vl"
        assert data.dataloader_param.collate_param.model_name == "qwen2vl" and data.dataset_param.attr.videos is None
    assert json.loads((REPO / "configs/qwen2_5_vl_7b/model.json").read_text()) == json.loads(
        (EXAMPLES / "model_7b.json").read_text())
