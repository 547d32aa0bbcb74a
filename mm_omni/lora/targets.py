"""Parsing ``--lora-target-modules`` (no torch: the flag is checked before anything is built)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

ALL_LINEAR = ("all-linear", "all")
_EXCLUDED_FROM_ALL = ("output_layer",)  # the LM head: target it by name if wanted


class LoraTargetError(ValueError):
    """A target that matches nothing, or matches a module LoRA cannot adapt."""


@dataclass(frozen=True)
class Target:
    text: str
    path: str   # "" = anywhere
    leaf: str   # last module name, or "" for any linear

    def matches(self, name: str) -> bool:
        parts = name.split(".")
        if self.leaf:
            if parts[-1] != self.leaf:
                return False
            # the last name matched: the path must appear before it, at component boundaries
            return not self.path or f".{'.'.join(parts[:-1])}.".find(f".{self.path}.") >= 0
        return (not self.path or f".{name}.".find(f".{self.path}.") >= 0) and parts[-1] not in _EXCLUDED_FROM_ALL


def parse_targets(values: Sequence[str]) -> list[Target]:
    """Space- and/or comma-separated targets -> :class:`Target` list; a malformed one raises naming it."""
    out = []
    for value in values:
        for text in filter(None, (t.strip() for t in value.split(","))):
            if not re.fullmatch(r"[A-Za-z0-9_.\-]+", text) or ".." in text or text.startswith("."):
                raise LoraTargetError(f"--lora-target-modules {text!r}: not a module name; give names such as "
                                      "linear_qkv, text_decoder.linear_fc1 or all-linear")
            path, _, leaf = text.rpartition(".")
            out.append(Target(text, path, "" if leaf in ALL_LINEAR else leaf))
    return out
