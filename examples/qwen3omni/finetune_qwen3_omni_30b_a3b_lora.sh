#!/usr/bin/env bash
# LoRA fine-tuning of the Qwen3-Omni-30B-A3B thinker (ms-swift's recommended recipe: LoRA rank 8 on 4 GPUs of
# 80 GB, lr 1e-4): finetune_qwen3_omni_30b_a3b.sh with expert parallel 4 over 4 GPUs, the bf16 base frozen and
# adapters on every linear of the decoder, as ms-swift's all-linear: fused QKV, output projection and each
# expert's two linears (one adapter per expert; the router and the LM head get none). The encoders are frozen in
# model_30b_a3b.json, so they get none either. LORA_ARGS="--lora-target-modules linear_qkv linear_proj ..."
# narrows it to attention. Checkpoints hold the adapters only (one directory per EP rank); `mm-convert
# Qwen3_OmniConverter mm_to_hf --cfg.lora_load_dir <save_dir>` merges them into the export,
# `--cfg.save_lora_as_peft true` writes a PEFT adapter (the experts' on transformers' fused expert parameters).
#   bash examples/qwen3omni/finetune_qwen3_omni_30b_a3b_lora.sh [extra flags]
# Convert with --cfg.parallel_config.ep_size 4 (the EP below).
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export NPUS_PER_NODE=${NPUS_PER_NODE:-${GPUS_PER_NODE:-4}}
export EP=${EP:-4}
export LR=${LR:-1.0e-4}
export GRAD_ACC_STEP=${GRAD_ACC_STEP:-4}
export RECOMPUTE_ARGS=${RECOMPUTE_ARGS-""}  # the frozen base keeps no weight gradients: activations fit
export LORA_ARGS=${LORA_ARGS:-"--lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2 --lora-r ${LORA_R:-8} --lora-alpha ${LORA_ALPHA:-32}"}
exec bash "$HERE/finetune_qwen3_omni_30b_a3b.sh" "$@"
