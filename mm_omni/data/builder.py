"""Build the training DataLoader from ``data.json`` (what ``mm_omni.train`` calls)."""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
from torch.utils.data import DataLoader

from mm_omni.config.data import DataConfig, packing_budget
from mm_omni.data.collate import OmniCollator
from mm_omni.data.dataset import OmniSFTDataset
from mm_omni.data.packing import TokenBudgetBatchSampler, bucket_lengths
from mm_omni.data.sampler import ResumableBatchSampler
from mm_omni.platform import CPU, get_platform

logger = logging.getLogger(__name__)


def build_dataloader(
    cfg: DataConfig,
    *,
    micro_batch_size: int,
    seq_length: Optional[int] = None,
    dp_rank: int = 0,
    dp_size: int = 1,
    seed: int = 0,
    consumed_samples: int = 0,
    num_workers: Optional[int] = None,
    processor=None,
    dataset: Optional[OmniSFTDataset] = None,
    segment_multiple: int = 1,
) -> DataLoader:
    """This DP rank's micro-batches, resuming after ``consumed_samples``.

    A micro-batch is ``micro_batch_size`` rows, or with ``dataloader_param.packing: "budget"``
    ``micro_batch_size`` packs of at most ``seq_length`` tokens (:mod:`mm_omni.data.packing`; then a
    pack is what ``consumed_samples`` counts). ``segment_multiple``: what every packed sequence is padded
    to (context / sequence parallelism's split multiple). ``num_workers``: ``dataloader_param.num_workers``
    when set in data.json, else this (``--num-workers``), else 0.
    """
    dl = cfg.dataloader_param
    budget = packing_budget(cfg, seq_length)
    dataset = dataset or OmniSFTDataset(cfg, seq_length, processor=processor)
    shuffle = dl.shuffle and dl.sampler_type != "SequentialSampler"
    pad_to = dl.collate_param.pad_to_multiple_of
    if budget is None:
        sampler = ResumableBatchSampler(len(dataset), micro_batch_size, dp_rank, dp_size, seed=seed,
                                        consumed_samples=consumed_samples, shuffle=shuffle)
        collator = OmniCollator(dataset.encoder.tokens.pad, packing=bool(dl.packing), pad_to_multiple_of=pad_to)
    else:
        sampler = TokenBudgetBatchSampler(dataset.lengths(), budget, micro_batch_size, dp_rank, dp_size, seed=seed,
                                          consumed_samples=consumed_samples, shuffle=shuffle,
                                          window=dl.packing_window, multiple=segment_multiple)
        key = (len(dataset), budget, dl.packing_window, seed, shuffle, segment_multiple)
        first = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        if first and key not in _LOGGED:  # once, not per pipeline chunk or rank
            _LOGGED.add(key)
            logger.info("%s", sampler.stats().describe())
        buckets = bucket_lengths(budget, micro_batch_size, math.lcm(pad_to, segment_multiple))
        collator = OmniCollator(dataset.encoder.tokens.pad, packing=True, pad_to_multiple_of=pad_to,
                                bucket_lengths=buckets, segment_multiple=segment_multiple)
    workers = dl.num_workers if dl.num_workers is not None else (num_workers or 0)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=workers,
                      pin_memory=dl.pin_memory and get_platform().name != CPU, persistent_workers=workers > 0)


_LOGGED: set = set()
