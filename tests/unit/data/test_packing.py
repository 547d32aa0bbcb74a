"""Token-budget packing: packs respect the budget and never split a row; the pack stream is deterministic,
resumes exactly from consumed_samples and is the same on any DP size; the collator's bucket padding; the
data.json packing keys."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from mm_omni.config.data import load_data_config, packing_budget
from mm_omni.data.collate import PAD_POSITION, OmniCollator
from mm_omni.data.packing import TokenBudgetBatchSampler, bucket_lengths, first_fit_decreasing
from mm_omni.data.template import IGNORE_INDEX
from mm_omni.models.text.flops import row_lengths
from mm_omni.parallel.context_parallel import pad_for_context_parallel


def _lengths(n: int, budget: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice([rng.randint(1, budget // 8), rng.randint(1, budget)]) for _ in range(n)]


def _stream(lengths, budget, mbs, dp, steps, consumed=0, **kw):
    """The global stream of micro-batches (rank 0's, rank 1's, ... per step) from ``consumed`` on."""
    its = [iter(TokenBudgetBatchSampler(lengths, budget, mbs, r, dp, consumed_samples=consumed, **kw))
           for r in range(dp)]
    return [next(it) for _ in range(steps) for it in its]


@pytest.mark.parametrize("window", [1, 7, 64, 1000])
def test_packs_fit_the_budget_and_hold_every_row_once(window):
    budget, lengths = 100, _lengths(300, 100)
    sampler = TokenBudgetBatchSampler(lengths, budget, 1, seed=5, window=window)
    for epoch in range(2):
        packs = sampler.epoch_packs(epoch)
        assert sorted(i for p in packs for i in p) == list(range(300))  # no row split, lost or repeated
        assert all(sum(lengths[i] for i in p) <= budget for p in packs)
        order = torch.randperm(300, generator=torch.Generator().manual_seed(5 + epoch)).tolist()
        place = {row: k for k, row in enumerate(order)}
        assert all([place[i] for i in p] == sorted(place[i] for i in p) for p in packs)  # stream order inside
    if window == 1:
        assert len(sampler.epoch_packs(0)) == 300  # a window of one row packs nothing together
    if window == 1000:  # one window: first-fit-decreasing is within 11/9 OPT + 1 of the optimum
        assert len(sampler.epoch_packs(0)) <= 11 / 9 * sum(lengths) / budget + 1


def test_first_fit_decreasing_rule():
    # longest first, ties by position, each into the first pack with room; rows in a pack in index order
    assert first_fit_decreasing([5, 6, 4, 3, 2, 5], 10) == [[1, 2], [0, 5], [3, 4]]
    assert first_fit_decreasing([10, 10, 1], 10) == [[0], [1], [2]]


def test_deterministic_and_seeded():
    lengths = _lengths(200, 64)
    a = _stream(lengths, 64, 2, 1, 40, seed=3, window=16)
    assert a == _stream(lengths, 64, 2, 1, 40, seed=3, window=16)
    assert a != _stream(lengths, 64, 2, 1, 40, seed=4, window=16)
    assert a != _stream(lengths, 64, 2, 1, 40, seed=3, window=32)
    unshuffled = TokenBudgetBatchSampler(lengths, 64, 1, shuffle=False, window=16)
    assert unshuffled.epoch_packs(0) == unshuffled.epoch_packs(1)  # no shuffle: every epoch the same
    # first-fit-decreasing order inside each window: packs of longer first rows lead it
    first = unshuffled.epoch_packs(0)[0]
    assert max(lengths[i] for i in first) == max(lengths[:16])


def test_resume_bit_exact_across_epochs():
    lengths = _lengths(50, 40)
    sampler = TokenBudgetBatchSampler(lengths, 40, 2, 0, 2, seed=1, window=8)
    per_epoch = len(sampler.epoch_packs(0))
    steps = 3 * per_epoch // 4 + 2  # several epochs of 4 packs per step
    full = _stream(lengths, 40, 2, 2, steps, seed=1, window=8)
    for k in (1, 5, per_epoch // 4, steps - 3):  # micro-batches of every rank consumed: 4 packs a step
        resumed = _stream(lengths, 40, 2, 2, steps - k, consumed=4 * k, seed=1, window=8)
        assert resumed == full[2 * k:], k
    # a resumed sampler holds only the epoch it reads
    late = TokenBudgetBatchSampler(lengths, 40, 2, consumed_samples=5 * per_epoch + 3, seed=1, window=8)
    next(iter(late))
    assert late._epoch == 5 and len(late._starts) == 7


def test_dp_ranks_take_slices_of_one_stream():
    lengths = _lengths(90, 48)
    single = _stream(lengths, 48, 1, 1, 48, seed=2)  # one pack per micro-batch
    for mbs, dp in ((2, 1), (1, 2), (2, 2), (3, 4)):
        steps = 48 // (mbs * dp)
        multi = _stream(lengths, 48, mbs, dp, steps, seed=2)
        for t in range(steps):
            for r in range(dp):  # rank r, step t: packs t*mbs*dp + r*mbs ... + mbs of the one-rank stream
                first = t * mbs * dp + r * mbs
                assert multi[t * dp + r] == [i for pack in single[first:first + mbs] for i in pack]


def test_rows_rounded_to_the_split_multiple_still_fit():
    lengths = [13, 13, 6, 7]
    sampler = TokenBudgetBatchSampler(lengths, 32, 1, multiple=4, shuffle=False)
    packs = sampler.epoch_packs(0)
    assert all(sum(-(-lengths[i] // 4) * 4 for i in p) <= 32 for p in packs)
    assert packs == [[0, 1], [2, 3]]  # 16 + 16 leaves no room for 8
    assert TokenBudgetBatchSampler(lengths, 32, 1, shuffle=False).epoch_packs(0) == [[0, 1, 2], [3]]  # 13+13+6
    with pytest.raises(ValueError, match=r"row 0 has 31 tokens \(32 padded to a multiple of 4\).*cutoff_len"):
        TokenBudgetBatchSampler([31, 3], 30, 1, multiple=4)


def test_stats():
    sampler = TokenBudgetBatchSampler([6, 4, 5, 5, 3], 10, 1, shuffle=False)
    st = sampler.stats()
    assert (st.packs, st.max_rows, st.tokens) == (3, 2, 23)
    assert st.efficiency == pytest.approx(23 / 30)
    assert "3 packs per epoch of 5 rows" in st.describe() and "76.7%" in st.describe()


def test_bucket_rule():
    assert bucket_lengths(3072, 1, 8) == (768, 1536, 2304, 3072)
    assert bucket_lengths(1000, 2, 24) == (504, 1008, 1512, 2016)
    assert bucket_lengths(10, 1, 8) == (8, 16)  # rounding merges buckets


def _row(n: int, start: int, first_label: int = 2):
    ids = torch.arange(start, start + n)
    labels = ids.clone()
    labels[:first_label] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(n).expand(3, n).clone()}


def test_bucket_padding_is_its_own_sequence():
    rows = [_row(5, 10), _row(9, 20)]
    plain = OmniCollator(0, packing=True)(rows)
    batch = OmniCollator(0, packing=True, bucket_lengths=(8, 16, 24, 32))(rows)
    assert batch["cu_seqlens"].tolist() == [0, 5, 14, 16]
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(batch[key][..., :14], plain[key]), key
    assert batch["input_ids"][0, 14:].tolist() == [0, 0]
    assert (batch["labels"][0, 14:] == IGNORE_INDEX).all() and (batch["position_ids"][..., 14:] == PAD_POSITION).all()
    assert batch["attention_mask"].tolist() == [[1] * 14 + [0] * 2]
    assert row_lengths(batch) == [5, 9]  # FLOPs (MFU) count no padding
    exact = OmniCollator(0, packing=True, bucket_lengths=(14, 28))(rows)
    assert exact["cu_seqlens"].tolist() == [0, 5, 14]  # no empty padding sequence
    with pytest.raises(ValueError, match="longer than the largest bucket 12"):
        OmniCollator(0, packing=True, bucket_lengths=(12,))(rows)


def test_context_parallel_padding_of_a_budget_batch():
    """Rows padded to the split multiple by the collator: pad_for_context_parallel finds nothing to do; without
    it, pad_for_context_parallel still pads every sequence (the bucket padding's too)."""
    rows = [_row(5, 10), _row(9, 20)]
    ready = OmniCollator(0, packing=True, bucket_lengths=(16, 32), segment_multiple=4)(rows)
    assert ready["cu_seqlens"].tolist() == [0, 8, 20, 32]
    assert ready["input_ids"][0, 5:8].tolist() == [0, 0, 0] and (ready["labels"][0, 5:8] == IGNORE_INDEX).all()
    assert ready["attention_mask"][0].sum() == 14
    assert pad_for_context_parallel(ready, 4) is ready
    loose = OmniCollator(0, packing=True, bucket_lengths=(16, 24))(rows)
    assert loose["cu_seqlens"].tolist() == [0, 5, 14, 16]
    padded = pad_for_context_parallel(loose, 4)
    assert padded["cu_seqlens"].tolist() == [0, 8, 20, 24]
    assert padded["attention_mask"][0].sum() == 14
    assert row_lengths(ready) == row_lengths(padded) == [5, 9]


# -- data.json -------------------------------------------------------------------------------------------
def _data(**dataloader):
    raw = json.load(open("examples/qwen2.5omni/data_7b.json"))
    raw["dataloader_param"].update(dataloader)
    return raw


@pytest.mark.parametrize("value, mode", [(True, "budget"), ("budget", "budget"), (False, False),
                                         ("micro_batch", "micro_batch")])
def test_packing_values(value, mode):
    cfg = load_data_config(_data(packing=value))
    assert cfg.dataloader_param.packing == mode
    assert cfg.dataloader_param.packing_window == 512


def test_examples_pack_to_the_budget():
    for path in ("examples/qwen2.5omni/data_7b.json", "examples/qwen2.5omni/data_3b.json",
                 "examples/qwen2.5vl/data_7b.json", "examples/qwen2.5vl/data_3b.json"):
        assert load_data_config(path).dataloader_param.packing == "budget", path


def test_packing_errors_name_field_value_and_fix():
    with pytest.raises(ValueError, match=r"dataloader_param.packing='pack'.*set false.*\"budget\".*\"micro_batch\""):
        load_data_config(_data(packing="pack"))
    with pytest.raises(ValueError, match=r"dataloader_param.packing_window=0: .*greater than 0"):
        load_data_config(_data(packing_window=0))
    cfg = load_data_config(_data(packing=True))
    with pytest.raises(ValueError, match=r"packing='budget'.*no --seq-length.*pass --seq-length"):
        packing_budget(cfg, None)
    assert packing_budget(cfg, 2048) == 2048
    cfg.dataset_param.basic_parameters.cutoff_len = 4096
    with pytest.raises(ValueError, match=r"cutoff_len=4096 is longer than the packing budget --seq-length=2048"):
        packing_budget(cfg, 2048)
    assert packing_budget(load_data_config(_data(packing="micro_batch")), None) is None


def test_every_row_comes_once_per_epoch_through_the_micro_batches():
    lengths = _lengths(40, 32)
    sampler = TokenBudgetBatchSampler(lengths, 32, 3, seed=9, window=10)
    per_epoch = len(sampler.epoch_packs(0))
    it = iter(sampler)
    rows = Counter(i for _ in range(per_epoch // 3) for i in next(it))
    assert max(rows.values()) == 1  # within the first epoch no row repeats
