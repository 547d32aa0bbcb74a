"""``mm-omni`` console script: ``mm-omni train <flags>`` runs :mod:`mm_omni.train` (same flags)."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

COMMANDS = {"train": "fine-tune / pre-train (flags: python -m mm_omni.train --help)"}


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:8s} {doc}" for name, doc in COMMANDS.items())
        msg = f"usage: mm-omni <command> [flags]\ncommands:\n{lines}"
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"mm-omni: unknown command {argv[0]!r}\n{msg}")
        sys.stdout.write(msg + "\n")
        return
    from mm_omni.train import main as train_main

    train_main(argv[1:])


if __name__ == "__main__":
    main()
