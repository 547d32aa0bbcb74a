#!/usr/bin/env bash
# Full fine-tuning of the Qwen3-Omni-30B-A3B thinker with `-m mm_omni.train`: the MoE decoder trains, the vision
# and audio encoders are frozen (model_30b_a3b.json; ms-swift's full-SFT recipe freezes them too: set their
# "freeze" to false to train them). Run from the repository root:
#   bash examples/qwen3omni/finetune_qwen3_omni_30b_a3b.sh [extra flags]
# Every variable below can be set from the environment; multi node: run this on every node with the same
# MASTER_ADDR / MASTER_PORT / NNODES and its own NODE_RANK.
# Default layout, one node of 8 GPUs: expert parallel 8 (16 of the 128 experts per GPU), the dense part data
# parallel over the 8 (distributed optimizer), every decoder layer recomputed. The checkpoint at $LOAD_PATH
# comes from
#   mm-convert Qwen3_OmniConverter hf_to_mm --cfg.mm_dir ckpt/mm_path/Qwen3-Omni-30B-A3B-Instruct \
#       --cfg.hf_config.hf_dir ckpt/hf_path/Qwen3-Omni-30B-A3B-Instruct --cfg.parallel_config.ep_size 8
# (the same TP / PP / EP as below); mm_to_hf writes the fine-tuned thinker back with the talker and code2wav.
# Data: ms-swift's jsonl rows as they are ({"messages": [...], "images": [...], "audios": [...], "videos": [...]}
# with <image> / <audio> / <video> tags), packed into $SEQ_LENGTH-token sequences (data_30b_a3b.json).

# Ascend: source the CANN environment where it exists (a GPU machine has none)
ASCEND_SET_ENV=${ASCEND_SET_ENV:-/usr/local/Ascend/cann/set_env.sh}
if [ -f "$ASCEND_SET_ENV" ]; then
    # shellcheck disable=SC1090
    source "$ASCEND_SET_ENV"
    export ASCEND_SLOG_PRINT_TO_STDOUT=0 ASCEND_GLOBAL_LOG_LEVEL=3 TASK_QUEUE_ENABLE=2 COMBINED_ENABLE=1 \
        CPU_AFFINITY_CONF=1 HCCL_CONNECT_TIMEOUT=1200 NPU_ASD_ENABLE=0 ASCEND_LAUNCH_BLOCKING=0 \
        ACLNN_CACHE_LIMIT=100000
fi
export CUDA_DEVICE_MAX_CONNECTIONS=1
export TOKENIZERS_PARALLELISM=false

NPUS_PER_NODE=${NPUS_PER_NODE:-${GPUS_PER_NODE:-8}}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
WORLD_SIZE=$((NPUS_PER_NODE * NNODES))

MM_DATA=${MM_DATA:-"./examples/qwen3omni/data_30b_a3b.json"}
MM_MODEL=${MM_MODEL:-"./examples/qwen3omni/model_30b_a3b.json"}
LOAD_PATH=${LOAD_PATH:-"ckpt/mm_path/Qwen3-Omni-30B-A3B-Instruct"}
SAVE_PATH=${SAVE_PATH:-"save_dir"}

TP=${TP:-1}
PP=${PP:-1}
EP=${EP:-8}
CP=${CP:-1}
MBS=${MBS:-1}
GRAD_ACC_STEP=${GRAD_ACC_STEP:-4}
DP=$((WORLD_SIZE / TP / PP / CP))
GBS=${GBS:-$((MBS * GRAD_ACC_STEP * DP))}
TRAIN_ITERS=${TRAIN_ITERS:-5000}
SEQ_LENGTH=${SEQ_LENGTH:-8192}
LR=${LR:-1.0e-5}
# LoRA (finetune_qwen3_omni_30b_a3b_lora.sh sets them): adapter flags, empty for full fine-tuning
LORA_ARGS=${LORA_ARGS:-}
RECOMPUTE_ARGS=${RECOMPUTE_ARGS-"--recompute-granularity full --recompute-method uniform --recompute-num-layers 1"}
SP_ARGS=""
if [ "$TP" -gt 1 ]; then
    SP_ARGS="--sequence-parallel"  # the MoE dispatcher needs the sequence split over TP
fi

DISTRIBUTED_ARGS="
    --nproc_per_node $NPUS_PER_NODE \
    --nnodes $NNODES \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"

GPT_ARGS="
    --use-mcore-models \
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --expert-model-parallel-size ${EP} \
    --context-parallel-size ${CP} \
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --tokenizer-type NullTokenizer \
    --vocab-size ${VOCAB_SIZE:-152064} \
    --seq-length ${SEQ_LENGTH} \
    --make-vocab-size-divisible-by 1 \
    --normalization RMSNorm \
    --swiglu \
    --lr ${LR} \
    --lr-decay-style cosine \
    --weight-decay 0 \
    --train-iters ${TRAIN_ITERS} \
    --lr-warmup-fraction 0.05 \
    --clip-grad 1.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.999 \
    --seed 42 \
    --bf16 \
    --load $LOAD_PATH \
    --variable-seq-lengths \
    --use-distributed-optimizer \
    --no-load-optim \
    --no-load-rng \
    --num-workers ${NUM_WORKERS:-8} \
    --distributed-timeout-minutes 20 \
    $SP_ARGS \
    $RECOMPUTE_ARGS \
    $LORA_ARGS
"

MM_ARGS="
    --mm-data $MM_DATA \
    --mm-model $MM_MODEL
"

OUTPUT_ARGS="
    --log-interval 1 \
    --save-interval ${SAVE_INTERVAL:-1000} \
    --save $SAVE_PATH \
    --ckpt-format torch \
    --log-tps
"

mkdir -p logs
LOG_FILE=logs/train_$(date +%Y-%m-%d_%H:%M:%S).log
torchrun $DISTRIBUTED_ARGS -m mm_omni.train \
    $GPT_ARGS \
    $MM_ARGS \
    $OUTPUT_ARGS \
    --distributed-backend nccl \
    "$@" \
    2>&1 | tee "$LOG_FILE"
exit "${PIPESTATUS[0]}"
