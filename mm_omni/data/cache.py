"""Preprocessing cache: a small JSON index of kept rows, keyed by data + processor + config.

Key = sha256 over the dataset files' bytes, the processor directory's config/tokenizer files, the
data config fields that change tokens (template, pixel limits, fps, cutoff, masking...) and a
format version. Media files are not hashed (that would stat millions of files): after editing media
in place, set ``overwrite_cache``.

Writes are atomic (temp file in the same directory, fsync, ``os.replace``), so several processes
or nodes writing the same key at once leave one complete file; a file lock lets the ranks of one
node wait for the first instead of all computing it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from filelock import FileLock

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
_PROCESSOR_FILES = (
    "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "config.json",
)


def _file_digest(path: str, h) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def cache_key(dataset_files: list[str], processor_dir: str, settings: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": CACHE_VERSION, "settings": settings}, sort_keys=True).encode())
    for path in dataset_files:
        h.update(os.path.abspath(path).encode())
        _file_digest(path, h)
    for name in _PROCESSOR_FILES:
        p = Path(processor_dir) / name
        if p.is_file():
            h.update(name.encode())
            _file_digest(str(p), h)
    return h.hexdigest()[:24]


def atomic_write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_or_build(cache_dir: Optional[str], key: str, build: Callable[[], dict], overwrite: bool = False) -> dict:
    """The cached payload for ``key``, built (and stored, when ``cache_dir`` is set) if missing."""
    if not cache_dir:
        return build()
    path = Path(cache_dir) / f"omni_sft_{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.is_file() and not overwrite:
            try:
                with open(path, encoding="utf-8") as f:
                    payload = json.load(f)
                logger.info("data cache hit: %s (%d rows)", path, len(payload["rows"]))
                return payload
            except (json.JSONDecodeError, KeyError) as exc:
                logger.warning("data cache %s is unreadable (%s): rebuilding", path, exc)
        payload = build()
        atomic_write_json(path, payload)
        logger.info("data cache written: %s", path)
        return payload
