#!/usr/bin/env bash
# Fine-tune Qwen2.5-Omni-3B: the 7B launcher on model_3b.json / data_3b.json (MindSpeed-MM ships no 3B script).
# Run from the repository root:  bash examples/qwen2.5omni/finetune_qwen2_5_omni_3b.sh [extra trainer flags]
# Every variable of finetune_qwen2_5_omni_7b.sh can be set from the environment; the defaults below are the 3B's
# (model_3b.json splits the text decoder [14, 22] over PP=2, the launcher's default).
export MM_DATA=${MM_DATA:-"./examples/qwen2.5omni/data_3b.json"}
export MM_MODEL=${MM_MODEL:-"./examples/qwen2.5omni/model_3b.json"}
export LOAD_PATH=${LOAD_PATH:-"ckpt/mm_path/Qwen2.5-Omni-3B"}
export VOCAB_SIZE=${VOCAB_SIZE:-151936}
exec bash "$(dirname "$0")/finetune_qwen2_5_omni_7b.sh" "$@"
