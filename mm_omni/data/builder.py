"""Build the training DataLoader from ``data.json`` (what ``mm_omni.train`` calls)."""

from __future__ import annotations

import logging
from typing import Optional

from torch.utils.data import DataLoader

from mm_omni.config.data import DataConfig
from mm_omni.data.collate import OmniCollator
from mm_omni.data.dataset import OmniSFTDataset
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
) -> DataLoader:
    """Rows of this DP rank, ``micro_batch_size`` per batch, resuming after ``consumed_samples``.

    ``num_workers``: ``dataloader_param.num_workers`` when set in data.json, else this
    (``--num-workers``), else 0.
    """
    dl = cfg.dataloader_param
    dataset = dataset or OmniSFTDataset(cfg, seq_length, processor=processor)
    sampler = ResumableBatchSampler(
        len(dataset), micro_batch_size, dp_rank, dp_size, seed=seed, consumed_samples=consumed_samples,
        shuffle=dl.shuffle and dl.sampler_type != "SequentialSampler",
    )
    collator = OmniCollator(dataset.encoder.tokens.pad, packing=dl.packing,
                            pad_to_multiple_of=dl.collate_param.pad_to_multiple_of)
    workers = dl.num_workers if dl.num_workers is not None else (num_workers or 0)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=workers,
                      pin_memory=dl.pin_memory and get_platform().name != CPU, persistent_workers=workers > 0)
