#!/usr/bin/env bash
# Shared by .ci/run and examples/qwen2.5omni/demo.sh: create the repository's virtual environment on a fresh
# machine (Python >= 3.10 + pip only) and install mm_omni into it. Prints the environment's python on stdout.
#   MM_OMNI_VENV     where the environment lives (default: .venv in the repository)
#   MM_OMNI_PYTHON   the interpreter it is made with (default: python3); pip then picks the newest
#                    megatron-core that setup.py allows for that Python (0.16.x on 3.10/3.11, 0.19.x on 3.12+)
# A stamp in the environment records what was installed: a second call with an unchanged setup.py returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MM_OMNI_VENV:-.venv}
# torchvision is needed by transformers' video processors; this pair installs on CPU machines here.
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
BASE_PY=${MM_OMNI_PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$BASE_PY" -m venv "$VENV" >&2
fi
PY="$VENV/bin/python"
STAMP="$VENV/.mm_omni_setup"
WANT="$(cat setup.py; echo "$TORCH_PINS"; pwd)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  "$PY" -m pip install -q --upgrade pip >&2
  # shellcheck disable=SC2086
  "$PY" -m pip install -q $TORCH_PINS >&2
  "$PY" -m pip install -q -e ".[dev]" >&2
  printf '%s' "$WANT" > "$STAMP"
fi
echo "$PY"
