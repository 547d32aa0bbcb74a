"""The Megatron checkpoint layout: names, tracker, atomic directory and file writes."""

from __future__ import annotations

import os

import pytest
import torch

from mm_omni.checkpoint import format as fmt


def test_names():
    assert fmt.tag_dir_name(None) == "release" and fmt.tag_dir_name(100) == "iter_0000100"
    assert fmt.tag_dir_of("release") == "release" and fmt.tag_dir_of("42") == "iter_0000042"
    assert fmt.rank_dir_name(1, 3, 1) == "mp_rank_01" and fmt.rank_dir_name(1, 3, 4) == "mp_rank_01_003"
    assert fmt.parse_rank_dir("mp_rank_01_003") == (1, 3) and fmt.parse_rank_dir("mp_rank_07") == (7, 0)
    for name in ("mp_rank_1", "mp_rank_01_3", "mp_rank_01_003x", "iter_0000001"):
        assert fmt.parse_rank_dir(name) is None, name
    assert fmt.rank_file("/ck/release", 0, 1, 2).as_posix() == "/ck/release/mp_rank_00_001/model_optim_rng.pt"
    assert fmt.chunk_keys(1) == ["model"] and fmt.chunk_keys(3) == ["model0", "model1", "model2"]


def test_tracker_round_trip_and_atomic_replace(tmp_path, monkeypatch):
    assert fmt.read_tracker(tmp_path) is None
    fmt.write_tracker(tmp_path, "release")
    assert fmt.read_tracker(tmp_path) == "release"
    fmt.write_tracker(tmp_path, 7)
    assert (tmp_path / fmt.TRACKER).read_text() == "7" and sorted(p.name for p in tmp_path.iterdir()) == [fmt.TRACKER]

    def crash(src, dst):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        fmt.write_tracker(tmp_path, 8)
    assert fmt.read_tracker(tmp_path) == "7"  # the old tracker stays until the new one is complete


def test_atomic_dir_replaces_or_leaves_everything_as_it_was(tmp_path):
    dst = tmp_path / "out"
    with fmt.atomic_dir(dst) as tmp:
        assert tmp.parent == tmp_path and tmp != dst
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("first")
    assert (dst / "sub" / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError, match="failed"):
        with fmt.atomic_dir(dst) as tmp:
            (tmp / "b.txt").write_text("half")
            raise RuntimeError("failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (dst / "sub" / "a.txt").read_text() == "first"
    with fmt.atomic_dir(dst) as tmp:
        (tmp / "c.txt").write_text("second")
    assert sorted(p.name for p in dst.iterdir()) == ["c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp or old directories left


def test_replace_dir_and_save_synced(tmp_path):
    final, tmp = tmp_path / "iter_0000001", tmp_path / ".iter_0000001.tmp"
    tmp.mkdir()
    fmt.save_synced({"model": {"w": torch.arange(3)}}, tmp / fmt.MODEL_FILE)
    fmt.replace_dir(tmp, final)
    again = tmp_path / "again"
    again.mkdir()
    fmt.save_synced({"model": {"w": torch.arange(4)}}, again / fmt.MODEL_FILE)
    fmt.replace_dir(again, final)  # the same iteration saved twice: the old one is replaced
    assert torch.equal(torch.load(final / fmt.MODEL_FILE, weights_only=True)["model"]["w"], torch.arange(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001"]
