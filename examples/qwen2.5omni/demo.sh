#!/usr/bin/env bash
# The tiny CPU demo, on a fresh machine with Python >= 3.10 + pip only (the README's first command):
#   bash examples/qwen2.5omni/demo.sh [--workdir DIR] [--nproc 4] [--train-iters 30]
# Sets up .venv (the one .ci/run uses), then examples/qwen2.5omni/demo.py: builds a tiny random Qwen2.5-Omni
# (thinker + talker + token2wav) with a tiny processor and image/audio/video data, converts it to TP2/PP2 with
# mm-convert, fine-tunes it with torchrun on 4 CPU processes (gloo), converts it back and checks the result
# with transformers. Nothing is downloaded. Measured on 2 CPU cores: ~6 min to set up .venv from scratch,
# then ~45 s for the demo itself (more on a busy machine).
set -euo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
PY=$(bash .ci/setup_venv.sh)
echo "[demo] environment ready: $PY ($(( $(date +%s) - START ))s)"
export MM_OMNI_DEVICE=${MM_OMNI_DEVICE:-cpu} OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
"$PY" examples/qwen2.5omni/demo.py "$@"
echo "[demo] total wall time $(( $(date +%s) - START ))s"
