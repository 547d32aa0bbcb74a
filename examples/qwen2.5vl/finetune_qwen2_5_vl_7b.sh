#!/usr/bin/env bash
# Fine-tune Qwen2.5-VL-7B: MindSpeed-MM's examples/qwen2.5vl/finetune_qwen2_5_vl_7b.sh with `pretrain_vlm.py` ->
# `-m mm_omni.train`. Run from the repository root:  bash examples/qwen2.5vl/finetune_qwen2_5_vl_7b.sh [extra flags]
# Every variable below can be set from the environment (MindSpeed-MM hard-codes them); multi node: run this on
# every node with the same MASTER_ADDR / MASTER_PORT / NNODES and its own NODE_RANK.
# Model structure comes from $MM_MODEL (model_7b.json); the structure flags below are accepted and compared with
# it (model.json wins). Kernel flags (--use-flash-attn, --use-fused-rmsnorm, ...) are accepted with one log line;
# --context-parallel-algo ulysses_cp_algo is accepted and runs the exact all-gather context parallelism.
# The checkpoint at $LOAD_PATH comes from
#   mm-convert Qwen2_5_VLConverter hf_to_mm --cfg.mm_dir ckpt/mm_path/Qwen2.5-VL-7B-Instruct \
#       --cfg.hf_config.hf_dir ckpt/hf_path/Qwen2.5-VL-7B-Instruct \
#       --cfg.parallel_config.llm_pp_layers [[12,16]] --cfg.parallel_config.vit_pp_layers [[32,0]] \
#       --cfg.parallel_config.tp_size 1

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

MM_DATA=${MM_DATA:-"./examples/qwen2.5vl/data_7b.json"}
MM_MODEL=${MM_MODEL:-"./examples/qwen2.5vl/model_7b.json"}
MM_TOOL=${MM_TOOL:-}  # MindSpeed-MM's tools.json (profiling); accepted, not run here
LOAD_PATH=${LOAD_PATH:-"ckpt/mm_path/Qwen2.5-VL-7B-Instruct"}
SAVE_PATH=${SAVE_PATH:-"save_dir"}

TP=${TP:-1}
PP=${PP:-2}  # must match $MM_MODEL's text_decoder.pipeline_num_layers (7B: [12, 16]) and the converted layout
CP=${CP:-1}
MBS=${MBS:-1}
GRAD_ACC_STEP=${GRAD_ACC_STEP:-48}
DP=$((WORLD_SIZE / TP / PP / CP))
GBS=${GBS:-$((MBS * GRAD_ACC_STEP * DP))}
TRAIN_ITERS=${TRAIN_ITERS:-10000}
SEQ_LENGTH=${SEQ_LENGTH:-1024}

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
    --context-parallel-size ${CP} \
    --context-parallel-algo ulysses_cp_algo \
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --tokenizer-type NullTokenizer \
    --vocab-size ${VOCAB_SIZE:-152064} \
    --seq-length ${SEQ_LENGTH} \
    --make-vocab-size-divisible-by 1 \
    --normalization RMSNorm \
    --use-fused-rmsnorm \
    --swiglu \
    --use-fused-swiglu \
    --no-masked-softmax-fusion \
    --lr 1.0e-5 \
    --lr-decay-style cosine \
    --weight-decay 0 \
    --train-iters ${TRAIN_ITERS} \
    --lr-warmup-fraction 0.1 \
    --clip-grad 0.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.999 \
    --seed 42 \
    --bf16 \
    --load $LOAD_PATH \
    --use-flash-attn \
    --variable-seq-lengths \
    --use-distributed-optimizer \
    --no-load-optim \
    --no-load-rng \
    --no-save-optim \
    --no-save-rng \
    --num-workers ${NUM_WORKERS:-8} \
    --distributed-timeout-minutes 20
"

MM_ARGS="
    --mm-data $MM_DATA \
    --mm-model $MM_MODEL
"
if [ -n "$MM_TOOL" ]; then
    MM_ARGS="$MM_ARGS --mm-tool $MM_TOOL"
fi

OUTPUT_ARGS="
    --log-interval 1 \
    --save-interval 10000 \
    --eval-interval 10000 \
    --eval-iters 5000 \
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
STATUS=${PIPESTATUS[0]}

# mean step time over iterations 50-150 of the log (MindSpeed-MM's summary), when the run got that far
STEP_MS=$(grep "elapsed time per iteration" "$LOG_FILE" | sed -n '50,150p' \
    | sed -E 's/.*elapsed time per iteration \(ms\): ([0-9.]+).*/\1/' \
    | awk '{s += $1; n++} END {if (n) printf "%.1f", s / n}')
if [ -n "$STEP_MS" ]; then
    echo "mean elapsed time per iteration (iterations 50-150): ${STEP_MS} ms;" \
        "samples/s: $(awk -v g="$GBS" -v t="$STEP_MS" 'BEGIN {printf "%.2f", g * 1000 / t}')"
fi
exit "$STATUS"
