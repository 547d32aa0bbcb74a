"""Run a worker script under ``torchrun`` (gloo on CPU) from a pytest test."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(script: Path, nproc: int, *args: str, timeout: int = 600) -> str:
    """Launch ``script`` on ``nproc`` local processes; return its stdout, raise with the log on failure.

    A free port can be taken by another process between ``free_port`` and torchrun's bind: such a
    launch (EADDRINUSE) is retried on a new port, any other failure is reported at once.
    """
    env = dict(os.environ, MM_OMNI_DEVICE="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for attempt in range(3):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(script), *args,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
        if proc.returncode == 0:
            return proc.stdout
        if "EADDRINUSE" not in proc.stderr + proc.stdout or attempt == 2:
            raise AssertionError(f"torchrun {script.name} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                                 f"{proc.stderr[-8000:]}")
    raise AssertionError("unreachable")
