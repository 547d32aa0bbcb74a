"""What the tiny CPU demos share: step timing, running a command with its log, a free port, reading shards."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


class Timer:
    def __init__(self):
        self.steps: list[tuple[str, float]] = []

    def __call__(self, name: str, fn, *args, **kw):
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        self.steps.append((name, time.perf_counter() - t0))
        log(f"{name}: {self.steps[-1][1]:.1f}s")
        return out


def run(cmd: list[str], log_file: Path) -> str:
    """Run a command, tee its output to ``log_file``; fail with the log's tail."""
    env = dict(os.environ, MM_OMNI_DEVICE=os.environ.get("MM_OMNI_DEVICE", "cpu"), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    log_file.write_text(proc.stdout)
    if proc.returncode:
        raise SystemExit(f"[demo] failed ({proc.returncode}): {' '.join(cmd[:4])} ...; log {log_file}:\n"
                         + proc.stdout[-6000:])
    return proc.stdout


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out
