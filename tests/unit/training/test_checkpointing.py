"""Checkpoints in one process (gloo, world size 1): atomic saves, release / fine-tune loads, freezing.

Resume equality across ranks (DP2 + distributed optimizer) is in tests/distributed/test_train_parallel.py.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from mm_omni.config.arguments import ArgumentsError
from mm_omni.train import main
from mm_omni.training import checkpointing
from tests.distributed.standin_task import standin_task
from tests.distributed.torchrun import free_port

FLAGS = ["--lr", "1e-3", "--train-iters", "3", "--global-batch-size", "2", "--log-interval", "1",
         "--lr-decay-style", "constant"]


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                     LOCAL_RANK="0").items():
        monkeypatch.setenv(k, v)


def train(flags, freeze=(), record=None):
    def factory(args, model_cfg):
        task = standin_task(args, freeze)
        if record is not None:
            provider = task.model_provider

            def recording(pre, post, vp):
                model = provider(pre, post, vp)
                record.append({n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad})
                record.append(model)
                return model

            task.model_provider = recording
        return task

    return main(FLAGS + flags, task_factory=factory)


def test_interrupted_save_keeps_previous_checkpoint_loadable(tmp_path, monkeypatch):
    ref = train([])
    save = ["--save", str(tmp_path), "--save-interval", "1"]
    real_replace = checkpointing.os.replace

    def crash_on_tracker_of_2(src, dst):  # the new directory is in place; the tracker is not yet updated
        if str(dst).endswith(checkpointing.TRACKER) and (tmp_path / "iter_0000002").exists():
            raise KeyboardInterrupt("killed during save")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpointing.os, "replace", crash_on_tracker_of_2)
    with pytest.raises(KeyboardInterrupt):
        train(save)
    monkeypatch.setattr(checkpointing.os, "replace", real_replace)
    assert checkpointing.read_tracker(tmp_path) == "1"

    # a crash while files are still being written: only the temp directory is left behind
    shutil.rmtree(tmp_path / "iter_0000002")
    real_save = checkpointing._save_synced
    monkeypatch.setattr(checkpointing, "_save_synced",
                        lambda obj, path: (_ for _ in ()).throw(KeyboardInterrupt("killed")) if ".iter_0000002" in str(path)
                        else real_save(obj, path))
    with pytest.raises(KeyboardInterrupt):
        train(save + ["--load", str(tmp_path)])
    monkeypatch.setattr(checkpointing, "_save_synced", real_save)
    assert checkpointing.read_tracker(tmp_path) == "1" and (tmp_path / ".iter_0000002.tmp").exists()

    resumed = train(save + ["--load", str(tmp_path)])  # loads iteration 1, cleans the temp dir
    assert sorted(resumed.losses) == [2, 3]
    assert resumed.losses == {k: ref.losses[k] for k in (2, 3)}
    assert checkpointing.read_tracker(tmp_path) == "3" and not (tmp_path / ".iter_0000002.tmp").exists()


def test_release_checkpoint_loads_with_finetune(tmp_path):
    train(["--train-iters", "2", "--save", str(tmp_path / "run")])
    state = torch.load(tmp_path / "run" / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    # what mm-convert writes: model weights only (no _extra_state entries), tracker "release"
    model = {k: v for k, v in state["model"].items() if not k.endswith("_extra_state")}
    release = tmp_path / "release_ckpt"
    (release / "release" / "mp_rank_00").mkdir(parents=True)
    torch.save({"model": model, "checkpoint_version": 3.0}, release / "release" / "mp_rank_00" / "model_optim_rng.pt")
    (release / checkpointing.TRACKER).write_text("release")

    from_release = train(["--train-iters", "1", "--load", str(release), "--no-load-optim", "--no-load-rng"])
    finetune = train(["--train-iters", "1", "--load", str(tmp_path / "run"), "--finetune"])
    scratch = train(["--train-iters", "1"])
    assert from_release.iteration == finetune.iteration == 1  # both start at iteration 0
    assert from_release.losses[1] == finetune.losses[1] != scratch.losses[1]


def test_layout_mismatch_names_the_flags(tmp_path):
    (tmp_path / "iter_0000001" / "mp_rank_00_000").mkdir(parents=True)
    (tmp_path / checkpointing.TRACKER).write_text("1")
    with pytest.raises(FileNotFoundError, match="--pipeline-model-parallel-size 1"):
        train(["--load", str(tmp_path)])


def test_all_frozen_rank_needs_dummy_optimizer():
    with pytest.raises(ArgumentsError, match="--enable-dummy-optimizer"):
        train([], freeze=("embedding", "decoder", "output_layer"))
    record = []
    result = train(["--enable-dummy-optimizer"], freeze=("embedding", "decoder", "output_layer"), record=record)
    before, model = record
    assert result.iteration == 3 and before
    after = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("precision", ["--bf16", "--fp16"])
def test_half_precision_trains_close_to_fp32(precision):
    fp32 = train([])
    half = train([precision])
    for k in fp32.losses:
        assert abs(half.losses[k] - fp32.losses[k]) < 2e-2 * fp32.losses[k]


@pytest.mark.parametrize("name", ["model_optim_rng.pt", "distrib_optim.pt"])
def test_truncated_checkpoint_file_is_named_with_the_remedy(tmp_path, name):
    from mm_omni.checkpoint.files import RESUME_REMEDY, DamagedCheckpointError

    flags = ["--use-distributed-optimizer"]
    train(flags + ["--train-iters", "2", "--save", str(tmp_path)])
    path = tmp_path / "iter_0000002" / "mp_rank_00" / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a save cut off half way (full disk, killed copy)
    with pytest.raises(DamagedCheckpointError) as err:
        train(flags + ["--train-iters", "3", "--load", str(tmp_path)])
    message = str(err.value)
    assert str(path) in message and "damaged or truncated" in message and RESUME_REMEDY in message


def test_unreadable_tracker_is_named(tmp_path):
    train(["--train-iters", "1", "--save", str(tmp_path)])
    (tmp_path / checkpointing.TRACKER).write_text("iter_1")
    with pytest.raises(ValueError, match="latest_checkpointed_iteration.txt says 'iter_1'"):
        train(["--load", str(tmp_path)])
