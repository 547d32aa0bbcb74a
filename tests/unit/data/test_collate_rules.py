"""The collator's rules for a row's non-token values go by the kind of value, not by key: tensors concatenate
in row order (trailing sizes zero-padded to the batch's largest, integer tensors as int64), per-row scalars
become one entry per row and must be on every row, absent keys stay absent."""

from __future__ import annotations

import pytest
import torch

from mm_omni.data.collate import OmniCollator


def _row(n, **values):
    return dict(input_ids=torch.arange(n), labels=torch.arange(n), position_ids=torch.arange(n).expand(3, n),
                **values)


@pytest.mark.parametrize("packing", [False, True])
def test_any_media_key_concatenates_and_pads(packing):
    rows = [_row(3, feats=torch.ones(1, 2, 4), lens=torch.tensor([4], dtype=torch.int32), flag=True),
            _row(5, flag=False),
            _row(2, feats=torch.full((2, 2, 6), 2.0), lens=torch.tensor([6, 5], dtype=torch.int32), flag=False)]
    batch = OmniCollator(pad_token_id=0, packing=packing)(rows)
    assert batch["feats"].shape == (3, 2, 6) and batch["feats"].dtype == torch.float32
    assert batch["feats"][0, :, :4].eq(1).all() and batch["feats"][0, :, 4:].eq(0).all()
    assert batch["feats"][1:].eq(2).all()
    assert batch["lens"].dtype == torch.long and batch["lens"].tolist() == [4, 6, 5]
    assert batch["flag"].tolist() == [True, False, False]
    assert "missing" not in batch


def test_a_per_row_value_missing_on_a_row_is_an_error():
    with pytest.raises(ValueError, match="flag is on 1 of 2 rows"):
        OmniCollator(pad_token_id=0)([_row(3, flag=True), _row(2)])
