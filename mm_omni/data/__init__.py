"""Data pipeline: formats -> template -> media -> tokens/labels/positions -> collate/pack.

Entry points: :func:`mm_omni.config.data.load_data_config`, :class:`OmniSFTDataset`,
:func:`build_dataloader`.
"""

from mm_omni.data.builder import build_dataloader
from mm_omni.data.collate import OmniCollator
from mm_omni.data.dataset import OmniSFTDataset
from mm_omni.data.encode import RowEncoder, TooLongError
from mm_omni.data.formats import BadSampleError, Conversation
from mm_omni.data.packing import TokenBudgetBatchSampler
from mm_omni.data.sampler import ResumableBatchSampler
from mm_omni.data.template import IGNORE_INDEX

__all__ = [
    "BadSampleError", "Conversation", "IGNORE_INDEX", "OmniCollator", "OmniSFTDataset", "ResumableBatchSampler",
    "RowEncoder", "TokenBudgetBatchSampler", "TooLongError", "build_dataloader",
]
