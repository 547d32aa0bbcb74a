"""Read json / jsonl dataset files and normalise every row to one :class:`Conversation`.

Accepted rows (column names from ``attr`` when set, else auto-detected):

* sharegpt ``messages`` + ``role``/``content`` (MindSpeed-MM, LLaMA-Factory ``mllm_video_audio_demo``,
  ms-swift jsonl) and ``conversations`` + ``from``/``value`` (LLaVA / MindSpeed "mllm format");
* media columns ``images``/``videos``/``audios`` (lists) or LLaVA's single ``image`` / ``video`` /
  ``audio`` string.

Relative media paths resolve against ``dataset_dir``. Structural problems raise
:class:`BadSampleError` naming dataset, row index and path.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mm_omni.config.data import DatasetAttr

MEDIA_TAGS = {"image": "<image>", "video": "<video>", "audio": "<audio>"}
_MEDIA_KEYS = {"image": ("images", "image"), "video": ("videos", "video"), "audio": ("audios", "audio")}
_ROLE_ALIASES = {
    "user": ("user", "human"), "assistant": ("assistant", "gpt"), "system": ("system",),
}


class BadSampleError(ValueError):
    """A row that cannot be trained on; the message names dataset, row and (if any) file."""

    def __init__(self, dataset: str, index: int, reason: str, path: Optional[str] = None):
        self.dataset, self.index, self.reason, self.path = dataset, index, reason, path
        where = f" (file: {path})" if path else ""
        super().__init__(f"dataset {dataset!r} row {index}: {reason}{where}")


@dataclass
class Conversation:
    """One normalised row: roles are ``system``/``user``/``assistant``; content keeps the media tags."""

    messages: list[tuple[str, str]]
    images: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)
    audios: list[str] = field(default_factory=list)
    dataset: str = ""
    index: int = 0

    def media(self, kind: str) -> list[str]:
        return {"image": self.images, "video": self.videos, "audio": self.audios}[kind]


def read_rows(path: str) -> list[dict[str, Any]]:
    """All rows of a ``.json`` (a list) or ``.jsonl`` file."""
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            rows = []
            for lineno, line in enumerate(f):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise BadSampleError(path, lineno, f"invalid JSON line: {exc.msg}") from None
            return rows
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"dataset {path!r}: a .json dataset must hold a list of rows, got {type(data).__name__}")
    return data


def _pick(row: dict, configured: Optional[str], candidates: tuple[str, ...]) -> Optional[str]:
    if configured is not None and configured in row:
        return configured
    return next((c for c in candidates if c in row), None)


def _role(raw: Any, attr: DatasetAttr) -> Optional[str]:
    configured = {"user": attr.user_tag, "assistant": attr.assistant_tag, "system": attr.system_tag}
    for role, aliases in _ROLE_ALIASES.items():
        if raw == configured[role] or raw in aliases:
            return role
    return None


def _resolve(path: str, dataset_dir: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(dataset_dir, path))


def normalise_row(row: Any, attr: DatasetAttr, dataset_dir: str, dataset: str, index: int) -> Conversation:
    """Turn one raw row into a :class:`Conversation`, checking roles, tags and files."""

    def bad(reason: str, path: Optional[str] = None) -> BadSampleError:
        return BadSampleError(dataset, index, reason, path)

    if not isinstance(row, dict):
        raise bad(f"a row must be a JSON object, got {type(row).__name__}")
    msg_key = _pick(row, attr.messages, ("messages", "conversations"))
    if msg_key is None or not isinstance(row[msg_key], list) or not row[msg_key]:
        raise bad("no non-empty 'messages' / 'conversations' list")
    messages: list[tuple[str, str]] = []
    system_key = _pick(row, attr.system, ("system",))
    if system_key is not None and row[system_key]:
        messages.append(("system", str(row[system_key])))
    for turn in row[msg_key]:
        if not isinstance(turn, dict):
            raise bad(f"a turn must be an object, got {turn!r}")
        role_key = _pick(turn, attr.role_tag, ("role", "from"))
        content_key = _pick(turn, attr.content_tag, ("content", "value"))
        if role_key is None or content_key is None:
            raise bad(f"turn {turn!r} has no role/content keys (role_tag/content_tag in data.json)")
        role = _role(turn[role_key], attr)
        if role is None:
            raise bad(f"unsupported role {turn[role_key]!r} (expected user/human, assistant/gpt or system)")
        content = turn[content_key]
        if not isinstance(content, str):
            raise bad(f"content of a {role} turn must be a string, got {type(content).__name__}")
        messages.append((role, content))
    _check_roles(messages, bad)

    conv = Conversation(messages=messages, dataset=dataset, index=index)
    for kind, candidates in _MEDIA_KEYS.items():
        key = _pick(row, getattr(attr, f"{kind}s"), candidates)
        value = row.get(key) if key else None
        paths = [value] if isinstance(value, str) else list(value or [])
        tags = sum(c.count(MEDIA_TAGS[kind]) for r, c in messages if r == "user")
        if any(MEDIA_TAGS[kind] in c for r, c in messages if r != "user"):
            raise bad(f"{MEDIA_TAGS[kind]} tag outside a user turn (only user turns may hold media)")
        if tags != len(paths):
            raise bad(f"{tags} {MEDIA_TAGS[kind]} tag(s) but {len(paths)} {kind} file(s)",
                      ", ".join(map(str, paths)) or None)
        for p in paths:
            if not isinstance(p, str):
                raise bad(f"{kind} entry must be a path string, got {p!r}")
            resolved = _resolve(p, dataset_dir)
            if not os.path.isfile(resolved):
                raise bad(f"{kind} file not found", resolved)
            conv.media(kind).append(resolved)
    return conv


def _check_roles(messages: list[tuple[str, str]], bad) -> None:
    roles = [r for r, _ in messages]
    if "system" in roles[1:]:
        raise bad("a system turn is only allowed first")
    turns = roles[1:] if roles and roles[0] == "system" else roles
    if not turns or len(turns) % 2:
        raise bad(f"roles {roles}: need user/assistant pairs ending with an assistant turn")
    for i, role in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            raise bad(f"roles {roles}: turn {i} is {role!r}, expected {want!r} (user and assistant alternate)")


def dataset_path(name: str, dataset_dir: str) -> str:
    """A dataset entry of ``basic_parameters.dataset``: as given if it exists, else under dataset_dir."""
    if os.path.exists(name):
        return name
    candidate = Path(dataset_dir) / name
    if candidate.exists():
        return str(candidate)
    raise FileNotFoundError(f"dataset file {name!r} not found (also looked in dataset_dir {dataset_dir!r})")
