#!/usr/bin/env bash
# Fine-tune Qwen2.5-VL-3B: the 7B launcher on model_3b.json / data_3b.json (MindSpeed-MM ships no 3B script).
# Run from the repository root:  bash examples/qwen2.5vl/finetune_qwen2_5_vl_3b.sh [extra trainer flags]
# Every variable of finetune_qwen2_5_vl_7b.sh can be set from the environment; the defaults below are the 3B's
# (model_3b.json keeps all 36 text layers on one stage: PP=1; its output layer is tied to the embedding, and
# the converted checkpoint comes from mm-convert Qwen2_5_VLConverter hf_to_mm with llm_pp_layers [[36]],
# vit_pp_layers [[32]]).
export MM_DATA=${MM_DATA:-"./examples/qwen2.5vl/data_3b.json"}
export MM_MODEL=${MM_MODEL:-"./examples/qwen2.5vl/model_3b.json"}
export LOAD_PATH=${LOAD_PATH:-"ckpt/mm_path/Qwen2.5-VL-3B-Instruct"}
export VOCAB_SIZE=${VOCAB_SIZE:-151936}
export PP=${PP:-1}
exec bash "$(dirname "$0")/finetune_qwen2_5_vl_7b.sh" "$@"
