"""The supervised dataset: preprocess every row once (cached index), encode rows in data workers.

Preprocessing runs the full per-row pipeline (media decode, processor, labels, truncation) over all
datasets with a tqdm bar, so bad rows fail at start-up (naming dataset, row and file) instead of
hours into training, and rows that cannot fit ``cutoff_len`` are dropped and counted. The cache
keeps only the index of kept rows and their lengths; ``__getitem__`` re-encodes a row in the
worker (pixels and mel features would be far too large to cache).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections import Counter
from typing import Any, Optional

from torch.utils.data import Dataset
from tqdm import tqdm

from mm_omni.config.data import DataConfig, resolve_cutoff_len
from mm_omni.data.cache import cache_key, load_or_build
from mm_omni.data.encode import RowEncoder, TooLongError
from mm_omni.data.formats import BadSampleError, dataset_path, normalise_row, read_rows

logger = logging.getLogger(__name__)

_WORKER: dict[str, Any] = {}


def _init_worker(encoder: RowEncoder, raw: list[list[Any]], names: list[str]) -> None:
    _WORKER.update(encoder=encoder, raw=raw, names=names)


def _scan_one(task: tuple[int, int]) -> tuple[int, int, Optional[int], Optional[str], Optional[str]]:
    """``(ds, row, length, problem kind, message)`` for one row."""
    ds, r = task
    enc: RowEncoder = _WORKER["encoder"]
    bp = enc.cfg.dataset_param
    try:
        conv = normalise_row(_WORKER["raw"][ds][r], bp.attr, bp.basic_parameters.dataset_dir, _WORKER["names"][ds], r)
        return ds, r, len(enc.encode(conv)["input_ids"]), None, None
    except BadSampleError as exc:
        return ds, r, None, "bad", str(exc)
    except TooLongError as exc:
        return ds, r, None, "too_long", str(exc)


class OmniSFTDataset(Dataset):
    """Rows of all ``basic_parameters.dataset`` files that survive preprocessing."""

    def __init__(self, cfg: DataConfig, seq_length: Optional[int] = None, processor=None):
        self.cfg = cfg
        bp = cfg.dataset_param.basic_parameters
        self.cutoff_len = resolve_cutoff_len(cfg, seq_length)
        self.encoder = RowEncoder(cfg, self.cutoff_len, processor=processor)
        self.names = [dataset_path(name, bp.dataset_dir) for name in bp.dataset_files()]
        self.raw = [read_rows(p)[: bp.max_samples] if bp.max_samples else read_rows(p) for p in self.names]
        settings = {
            "cfg": cfg.dataset_param.model_dump(exclude={"basic_parameters": {"cache_dir", "overwrite_cache",
                                                                             "preprocessing_num_workers"}}),
            "cutoff_len": self.cutoff_len,
        }
        key = cache_key(self.names, cfg.dataset_param.preprocess_parameters.model_name_or_path, settings)
        payload = load_or_build(bp.cache_dir, key, self._scan, overwrite=bp.overwrite_cache)
        self.rows: list[tuple[int, int, int]] = [tuple(r) for r in payload["rows"]]
        self.stats: dict[str, int] = payload["stats"]
        logger.info("dataset: %d rows kept; %s", len(self.rows), self.stats)
        if not self.rows:
            raise ValueError(f"no trainable rows in {self.names} ({self.stats})")

    def _scan(self) -> dict:
        bp = self.cfg.dataset_param.basic_parameters
        tasks = [(d, r) for d, rows in enumerate(self.raw) for r in range(len(rows))]
        workers = bp.preprocessing_num_workers or 0
        stats: Counter = Counter()
        kept: list[list[int]] = []

        def handle(ds: int, r: int, length: Optional[int], kind: Optional[str], message: Optional[str]) -> None:
            if kind is None:
                kept.append([ds, r, length])
                stats["truncated"] += int(length == self.cutoff_len)
            elif kind == "too_long":
                stats["dropped_too_long"] += 1
                logger.warning("dropped: %s", message)
            elif bp.on_bad_sample == "skip":
                stats["skipped_bad"] += 1
                logger.warning("skipped bad row: %s", message)
            else:  # fail at the first bad row, not after scanning everything
                raise ValueError(f"{message} (set basic_parameters.on_bad_sample to \"skip\" to skip such rows)")

        with tqdm(total=len(tasks), desc="preprocessing rows", unit="row", mininterval=1.0) as bar:
            if workers > 1:
                ctx = mp.get_context("fork")
                with ctx.Pool(workers, initializer=_init_worker,
                              initargs=(self.encoder, self.raw, self.names)) as pool:
                    for res in pool.imap(_scan_one, tasks, chunksize=16):
                        handle(*res)
                        bar.update()
            else:
                _init_worker(self.encoder, self.raw, self.names)
                for task in tasks:
                    handle(*_scan_one(task))
                    bar.update()
        stats["kept"] = len(kept)
        return {"rows": kept, "stats": dict(stats)}

    def __len__(self) -> int:
        return len(self.rows)

    def lengths(self) -> list[int]:
        return [n for _, _, n in self.rows]

    def __getitem__(self, i: int) -> dict[str, Any]:
        ds, r, n = self.rows[i]
        bp = self.cfg.dataset_param
        conv = normalise_row(self.raw[ds][r], bp.attr, bp.basic_parameters.dataset_dir, self.names[ds], r)
        row = self.encoder.encode(conv)
        if len(row["input_ids"]) != n:
            raise RuntimeError(
                f"dataset {self.names[ds]!r} row {r}: {len(row['input_ids'])} tokens now, {n} when cached: "
                "media or processor changed; set basic_parameters.overwrite_cache to true"
            )
        return row
