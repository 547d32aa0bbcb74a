#!/usr/bin/env bash
# LoRA fine-tuning of the Qwen3-Omni-30B-A3B thinker (ms-swift's recommended recipe: LoRA rank 8 on 4 GPUs of
# 80 GB, lr 1e-4): finetune_qwen3_omni_30b_a3b.sh with expert parallel 4 over 4 GPUs, the bf16 base frozen and
# adapters on the decoder's attention (fused QKV and output projection; the experts get none, see
# docs/training.md). Checkpoints hold the adapters only; `mm-convert Qwen3_OmniConverter mm_to_hf
# --cfg.lora_load_dir <save_dir>` merges them into the export, `--cfg.save_lora_as_peft true` writes a PEFT adapter.
#   bash examples/qwen3omni/finetune_qwen3_omni_30b_a3b_lora.sh [extra flags]
# Convert with --cfg.parallel_config.ep_size 4 (the EP below).
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export NPUS_PER_NODE=${NPUS_PER_NODE:-${GPUS_PER_NODE:-4}}
export EP=${EP:-4}
export LR=${LR:-1.0e-4}
export GRAD_ACC_STEP=${GRAD_ACC_STEP:-4}
export RECOMPUTE_ARGS=${RECOMPUTE_ARGS-""}  # the frozen base keeps no weight gradients: activations fit
export LORA_ARGS=${LORA_ARGS:-"--lora-target-modules linear_qkv linear_proj --lora-r ${LORA_R:-8} --lora-alpha ${LORA_ALPHA:-32}"}
exec bash "$HERE/finetune_qwen3_omni_30b_a3b.sh" "$@"
