"""Budget-packed micro-batches train on the loss of the same rows unpacked (tiny OmniModel, fp32).

The rows of one micro-batch of :class:`TokenBudgetBatchSampler` (two packs) go through the model padded
(``[b, s]``) and packed to the budget (one ``[1, s]`` row, bucket padding as its own sequence); the
training loss (:func:`mm_omni.training.forward_step.loss_func`) must agree in every loss mode, per-sample
meaning the mean of the rows' means (not of the packs'), and so must the gradients of the per-sample loss.
The bucket padding itself changes nothing.
"""

from __future__ import annotations

import pytest
import torch

from mm_omni.data.collate import OmniCollator
from mm_omni.data.packing import TokenBudgetBatchSampler, bucket_lengths
from mm_omni.data.template import IGNORE_INDEX
from mm_omni.training.forward_step import MODES, loss_func
from tests.conftest import tiny_thinker_config
from tests.helpers import init_megatron, rel_err

BUDGET = 40
LENGTHS = [12, 7, 20, 5, 16, 9, 30, 3]
PROMPT = [3, 2, 19, 1, 4, 9, 5, 1]  # unlabelled tokens at the start of each row: row 5 has no label at all
TOL = 1e-6


def _rows(seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n, p in zip(LENGTHS, PROMPT):
        ids = torch.randint(0, 1000, (n,), generator=gen)
        labels = ids.clone()
        labels[:p] = IGNORE_INDEX
        pos = torch.arange(n).expand(3, n).clone()
        pos[1] += 1  # distinct M-RoPE axes, so the positions are checked to travel with their tokens
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return rows


@pytest.fixture(scope="module")
def model():
    from mm_omni.models.omni import OmniModel
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config
    from tests.helpers import randomize_

    init_megatron()
    torch.manual_seed(0)
    m = OmniModel(from_hf_thinker_config(tiny_thinker_config())).float()
    randomize_(m, 1)
    return m


def _run(model, batch, mode):
    from mm_omni.models.omni import OmniModel

    model.zero_grad(set_to_none=True)
    out = model(**{k: v for k, v in batch.items() if k in OmniModel.INPUT_KEYS})
    loss, count, report = loss_func(mode, out)
    value = loss / count.clamp(min=1) if mode != "per_token" else loss
    value.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), count, report["lm loss"], grads


@pytest.fixture(scope="module")
def micro_batch():
    rows = _rows()
    sampler = TokenBudgetBatchSampler(LENGTHS, BUDGET, micro_batch_size=2, seed=3, window=8)
    first = next(iter(sampler))
    assert len(sampler.epoch_packs(0)[0]) + len(sampler.epoch_packs(0)[1]) == len(first)
    assert len(first) >= 4, first  # the rows of two packs, several each
    return [rows[i] for i in first]


@pytest.mark.parametrize("mode", MODES)
def test_packed_to_budget_equals_unpacked(model, micro_batch, mode):
    buckets = bucket_lengths(BUDGET, 2, 8)
    padded = OmniCollator(0)(micro_batch)
    packed = OmniCollator(0, packing=True, bucket_lengths=buckets)(micro_batch)
    n_rows = len(micro_batch)
    assert packed["cu_seqlens"].numel() == n_rows + 2, "expected a bucket padding sequence"
    assert packed["input_ids"].shape[1] in buckets
    ref, got = _run(model, padded, mode), _run(model, packed, mode)
    assert int(got[1]) == int(ref[1])  # the divisor: label tokens, or rows with labels (per sample)
    if mode == "per_sample":
        assert int(got[1]) == sum(int((r["labels"][1:] != IGNORE_INDEX).any()) for r in micro_batch) == n_rows - 1
    assert rel_err(got[0], ref[0]) < TOL and rel_err(got[2], ref[2]) < TOL, (got[:3], ref[:3])
    if mode == "per_sample":  # the weights of the rows reach the gradients too
        assert set(got[3]) == set(ref[3])
        assert all(not got[3][n].any() for n, g in ref[3].items() if not g.any())  # the encoders' dummy path
        worst = max(rel_err(got[3][n], g) for n, g in ref[3].items() if g.any())
        assert worst < 1e-5, worst


def test_per_sample_is_the_mean_of_row_means(model, micro_batch):
    packed = OmniCollator(0, packing=True)(micro_batch)
    loss, count, _, _ = _run(model, packed, "per_sample")
    means = [float(_run(model, OmniCollator(0)([r]), "micro_batch_mean")[2][0]) for r in micro_batch
             if (r["labels"][1:] != IGNORE_INDEX).any()]
    assert rel_err(loss / count, torch.tensor(sum(means) / len(means))) < TOL
    # and not the mean over the packs' token means (what a per-row loss over [1, s] would give)
    pack_mean = float(_run(model, packed, "micro_batch_mean")[2][0])
    assert abs(pack_mean - float(loss / count)) > 1e-3


def test_bucket_padding_changes_nothing(model, micro_batch):
    plain = OmniCollator(0, packing=True)(micro_batch)
    for mode in MODES:
        ref = _run(model, plain, mode)
        for buckets in ((plain["input_ids"].shape[1] + 3,), bucket_lengths(BUDGET, 2, 8)):
            got = _run(model, OmniCollator(0, packing=True, bucket_lengths=buckets)(micro_batch), mode)
            assert int(got[1]) == int(ref[1]) and rel_err(got[0], ref[0]) < TOL, (mode, buckets)
