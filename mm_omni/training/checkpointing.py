"""Megatron-layout checkpoints, written atomically; resume restores everything a step depends on.

Layout (what Megatron and MindSpeed-MM's converter use)::

    <dir>/latest_checkpointed_iteration.txt        "100" or "release"
    <dir>/iter_0000100/mp_rank_{tp:02d}[_{pp:03d}[_{ep:03d}]]/model_optim_rng.pt
                                                  [distrib_optim.pt with --use-distributed-optimizer]

With expert parallelism (EP > 1) every rank directory names its EP rank (``mp_rank_00_000_001``): each
holds that EP rank's experts, numbered locally (``local_experts.0`` .. ``num_moe_experts / EP - 1``, as
megatron's ``SequentialMLP`` names them), and a copy of every other tensor. One rank writes each
directory: the first of the ranks that hold the same tensors (expert-data-parallel rank 0, which with
EP 1 is data x context-parallel rank 0). With ``--use-distributed-optimizer`` its ``distrib_optim.pt``
holds the state of each of megatron's optimizers (dense, experts) that this rank gathers (the first rank
of that optimizer's data-parallel group; ``None`` for the others), and a resume hands each back to
the rank that scatters it again.

``model_optim_rng.pt`` = ``{"model": sd}`` (``"model0"``, ``"model1"``... with virtual pipeline
chunks), ``"optimizer"``, ``"opt_param_scheduler"``, ``"rng_state"`` (one entry per data-parallel
rank), ``"iteration"``, ``"consumed_train_samples"``, ``"args"``, ``"checkpoint_version": 3.0``.

With LoRA (``--lora-target-modules``) the base weights are frozen and never change, so a save holds
only the parameters that train (every one with ``requires_grad``: the adapters, and anything else
left trainable, so nothing trained is lost) plus everything else above, marked ``"lora_only": True``
(MindSpeed's ``--lora-ckpt-filter`` checkpoints). Such a checkpoint is resumed with the base from
``--load`` and the rest from ``--lora-load DIR`` (MindSpeed-MM / ModelLink): the base's weights
load first, then DIR's trainable parameters, optimizer, scheduler, RNG and data position.

Every file is read through :func:`mm_omni.checkpoint.files.load_torch_file` (``weights_only``): a
truncated or overwritten file fails naming it, "damaged or truncated", and what to do instead.

Atomic: every rank writes under ``<dir>/.iter_XXXXXXX.tmp`` and fsyncs its files; after a barrier
rank 0 renames the directory into place and only then replaces ``latest_checkpointed_iteration.txt``
(write a temp file, fsync, rename). A save interrupted at any point leaves the previous checkpoint
and the tracker file as they were. The layout and the atomic steps are :mod:`mm_omni.checkpoint.format`'s.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.safe_globals import register_safe_globals

from mm_omni.checkpoint.files import RESUME_REMEDY, load_torch_file
from mm_omni.checkpoint.format import (CHECKPOINT_VERSION, MODEL_FILE, TRACKER, chunk_keys, fsync_dir, iteration_dir,
                                       rank_dir_name, read_tracker, replace_dir, write_tracker)
from mm_omni.checkpoint.format import save_synced as _save_synced
from mm_omni.training.model_setup import unwrap

logger = logging.getLogger(__name__)


def _my_rank_dir() -> str:
    return rank_dir_name(parallel_state.get_tensor_model_parallel_rank(),
                         parallel_state.get_pipeline_model_parallel_rank(),
                         parallel_state.get_pipeline_model_parallel_world_size(),
                         ep_rank=parallel_state.get_expert_model_parallel_rank(),
                         ep_size=parallel_state.get_expert_model_parallel_world_size())


def _writes_rank_dir() -> bool:
    """Whether this rank writes (and reads the optimizer state of) its rank directory: the first of the ranks
    holding the same tensors. Those are the expert-data-parallel group (EP 1: the data x context-parallel
    group, the same ranks), whose first rank also gathers the dense distributed-optimizer state."""
    return parallel_state.get_expert_data_parallel_rank() == 0


# -- save ----------------------------------------------------------------------------------------
def save_checkpoint(root, iteration: int, chunks, optimizer, scheduler, consumed_samples: int,
                    args: argparse.Namespace) -> Path:
    root = Path(root)
    final = iteration_dir(root, iteration)
    tmp = root / f".{final.name}.tmp"
    rank = torch.distributed.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left over from an interrupted save
    torch.distributed.barrier()

    rng = _gather_rng_states() if not args.no_save_rng else None
    distributed_opt = args.use_distributed_optimizer and not args.no_save_optim
    param_state = _dist_param_state(optimizer) if distributed_opt else None
    if _writes_rank_dir():
        state = {"iteration": iteration, "consumed_train_samples": consumed_samples,
                 "checkpoint_version": CHECKPOINT_VERSION, "args": _plain_args(args)}
        lora_only = bool(getattr(args, "lora_target_modules", None))
        state.update(model_state(chunks, trainable_only=lora_only))
        if lora_only:
            state["lora_only"] = True  # the frozen base is not in this file: resume with --load BASE --lora-load
        if not args.no_save_optim:
            state["optimizer"] = optimizer.state_dict()
            state["opt_param_scheduler"] = scheduler.state_dict()
        if rng is not None:
            state["rng_state"] = rng
        rank_dir = tmp / _my_rank_dir()
        rank_dir.mkdir(parents=True, exist_ok=True)
        _save_synced(state, rank_dir / MODEL_FILE)
        if param_state is not None:
            _save_synced(param_state, rank_dir / "distrib_optim.pt")
    torch.distributed.barrier()
    if rank == 0:
        _publish(root, tmp, final, iteration)
    torch.distributed.barrier()
    logger.info("saved checkpoint of iteration %d to %s", iteration, final)
    return final


def model_state(chunks, trainable_only: bool = False) -> dict:
    """``{"model": state_dict}`` (``model0``, ``model1``... per virtual chunk); with ``trainable_only``
    just the parameters that require grad (a LoRA run's adapters: the frozen base stays in --load)."""
    def state(chunk) -> dict:
        module = unwrap(chunk)
        sd = module.state_dict()
        if not trainable_only:
            return sd
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        return {k: v for k, v in sd.items() if k in trainable}

    return {key: state(c) for key, c in zip(chunk_keys(len(chunks)), chunks)}


def _dist_optimizers(optimizer) -> list:
    """The distributed optimizers inside megatron's (chained) optimizer."""
    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer])
            if hasattr(o, "get_parameter_state_dp_zero") and not getattr(o, "is_stub_optimizer", False)]


def _dist_param_state(optimizer) -> Optional[dict]:
    """The distributed optimizers' sharded state, each gathered on the first rank of its data-parallel group
    (a collective over those groups; ``None`` in the list where this rank is not that first rank).

    megatron's DP-zero format holds param / exp_avg / exp_avg_sq but not torch Adam's per-param
    ``step`` (TransformerEngine's Adam keeps it in the param group); it is the same for every
    parameter, so one value per optimizer is stored beside it.
    """
    opts = _dist_optimizers(optimizer)
    states = [o.get_parameter_state_dp_zero() for o in opts]
    if not states or not _writes_rank_dir():
        return None
    return {"buckets": states, "steps": [_adam_step(o) for o in opts]}


def _adam_step(opt):
    for state in opt.optimizer.state.values():
        if "step" in state:
            return state["step"]
    return None


@torch.no_grad()  # megatron copies into views of the (grad-requiring) fp32 params
def _load_dist_param_state(optimizer, path: Path) -> None:
    saved = None
    if _writes_rank_dir():  # the ranks that gather an optimizer's state write (and read) it
        saved = load_torch_file(path, RESUME_REMEDY)
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    steps = [saved["steps"] if saved is not None else None]
    torch.distributed.broadcast_object_list(steps, src=torch.distributed.get_global_rank(group, 0), group=group)
    for i, o in enumerate(_dist_optimizers(optimizer)):
        popped = [st.pop("step") for st in o.optimizer.state.values() if "step" in st]
        o.load_parameter_state_from_dp_zero(saved["buckets"][i] if saved is not None else None)
        step = steps[0][i] if steps[0][i] is not None else (popped[0] if popped else None)
        if popped and step is not None:
            for st in o.optimizer.state.values():
                st["step"] = step.clone()


def _publish(root: Path, tmp: Path, final: Path, iteration: int) -> None:
    """Rename the finished directory into place, then point the tracker at it (each step atomic)."""
    for d in tmp.iterdir():
        fsync_dir(d)
    fsync_dir(tmp)
    replace_dir(tmp, final)  # saving the same iteration again: the old one is moved aside first
    write_tracker(root, str(iteration))


def _rng_state() -> dict:
    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _gather_rng_states() -> list:
    """Every data-parallel rank's RNG state (they differ: dropout masks), in DP-rank order."""
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    states = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(states, _rng_state(), group=group)
    return states


def _plain_args(args: argparse.Namespace) -> dict:
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()
            if isinstance(v, (int, float, str, bool, list, set, type(None)))}


# -- load ----------------------------------------------------------------------------------------
def load_checkpoint(root, chunks, optimizer, scheduler, args: argparse.Namespace,
                    after_model_load=None) -> tuple[int, int]:
    """Load ``--load`` (and ``--lora-load``); return (iteration, consumed samples) to continue from
    ((0, 0) for a fine-tune start).

    With ``--lora-load DIR`` ``--load`` gives the base weights only (whatever its tag) and DIR the
    trainable parameters, then (unless DIR is a release or ``--finetune`` is given) the optimizer,
    scheduler, RNG and position. A DIR without a checkpoint yet is accepted when it is also ``--save``
    (the first launch of a script that always passes ``--lora-load $SAVE --save $SAVE``).
    ``after_model_load(chunks)`` runs once the weights are in, before the optimizer's copies follow them.
    """
    register_safe_globals()
    root = Path(root)
    path, release = _rank_file(root, "--load", args)
    start = _fresh_start(release, args)
    state = load_torch_file(path, RESUME_REMEDY)
    if state.get("lora_only"):
        raise ValueError(f"--load {root}: {path} holds only the trainable (LoRA) parameters of a run, not its base "
                         f"weights: give the base checkpoint that run loaded as --load and this directory as "
                         f"--lora-load {root}")
    lora_load = getattr(args, "lora_load", None)
    _load_model(chunks, state, path, adapters_follow=bool(lora_load))
    if lora_load:
        found = _rank_file(Path(lora_load), "--lora-load", args, missing_ok=_same_dir(lora_load, args.save))
        if found is None:
            logger.info("--lora-load %s holds no checkpoint yet (it is also --save): base weights from %s, the "
                        "adapters start from their initialisation", lora_load, path)
            start = "no --lora-load checkpoint yet"  # nothing to resume
        else:
            path, release = found
            start = _fresh_start(release, args)
            state = load_torch_file(path, RESUME_REMEDY)
            _load_trainable(chunks, state, path)
            logger.info("base weights from --load %s, trainable parameters from --lora-load %s", root, path)
    if after_model_load is not None:
        after_model_load(chunks)
    fresh = start is not None
    if fresh:
        logger.info("loaded model weights from %s (%s): starting at iteration 0", path, start)
    loaded_optim = False
    if not fresh and not args.no_load_optim and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
        if args.use_distributed_optimizer:
            _load_dist_param_state(optimizer, path.parent / "distrib_optim.pt")
        scheduler.load_state_dict(state["opt_param_scheduler"])
        loaded_optim = True
    if not loaded_optim:
        optimizer.reload_model_params()  # fp32 master copies follow the loaded weights
    if not fresh and not args.no_load_rng and "rng_state" in state:
        _set_rng_state(state["rng_state"])
    if fresh:
        return 0, 0
    logger.info("resumed from %s: iteration %d, %d consumed samples", path, state["iteration"],
                state["consumed_train_samples"])
    return state["iteration"], state["consumed_train_samples"]


def _rank_file(root: Path, flag: str, args: argparse.Namespace,
               missing_ok: bool = False) -> Optional[tuple[Path, bool]]:
    """This rank's ``model_optim_rng.pt`` under ``root`` (as the tracker says) and whether it is a release."""
    tag = read_tracker(root)
    if tag is None:
        if missing_ok:
            return None
        raise FileNotFoundError(f"{flag} {root}: no {TRACKER} there; give a directory written by --save or mm-convert")
    release = tag == "release"
    if not release and not tag.isdigit():
        raise ValueError(f"{flag} {root}: {root / TRACKER} says {tag!r}, neither an iteration number nor 'release'; "
                         f"{RESUME_REMEDY}")
    path = iteration_dir(root, None if release else int(tag)) / _my_rank_dir() / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {root}: {path} is missing (does the checkpoint's TP/PP/EP layout match "
                                f"--tensor-model-parallel-size {args.tensor_model_parallel_size} / "
                                f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size} / "
                                f"--expert-model-parallel-size {getattr(args, 'expert_model_parallel_size', 1)}?)")
    return path, release


def _fresh_start(release: bool, args: argparse.Namespace) -> Optional[str]:
    """Why the run starts at iteration 0 with a fresh optimizer (None: it resumes)."""
    return "release" if release else "--finetune" if args.finetune else None


def _same_dir(a, b) -> bool:
    return b is not None and Path(a).resolve() == Path(b).resolve()


def _load_model(chunks, state: dict, path: Path, adapters_follow: bool = False) -> None:
    for key, chunk in zip(chunk_keys(len(chunks)), chunks):
        if key not in state:
            raise KeyError(f"{path}: no '{key}' entry (found {sorted(state)}); virtual pipeline layout differs?")
        result = unwrap(chunk).load_state_dict(state[key], strict=False)
        # megatron modules add '_extra_state' entries that converters may leave out: only those may differ
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
        if missing and all(".lora_" in k for k in missing) and not any(".lora_" in k for k in state[key]):
            if not adapters_follow:
                logger.info("%s [%s]: a base checkpoint (no LoRA weights): %d LoRA tensors start from their "
                            "initialisation", path, key, len(missing))
            missing = []
        if unexpected and all(".lora_" in k for k in unexpected):
            raise KeyError(f"{path} [{key}] holds LoRA weights ({unexpected[:2]}...) but this model has no "
                           "adapters there: give the same --lora-target-modules / --lora-r as the run that saved "
                           "it, or merge them first (mm-convert ... mm_to_hf / resplit merge LoRA)")
        if missing or unexpected:
            raise KeyError(f"{path} [{key}] does not match the model: missing {missing[:8]} "
                           f"({len(missing)}), unexpected {unexpected[:8]} ({len(unexpected)})")


def _load_trainable(chunks, state: dict, path: Path) -> None:
    """``--lora-load``: every trainable parameter from ``state`` over the base. Each must be there (none
    may silently keep its initialisation) with its shape, and nothing unknown to the model may be."""
    for key, chunk in zip(chunk_keys(len(chunks)), chunks):
        if key not in state:
            raise KeyError(f"{path}: no '{key}' entry (found {sorted(state)}); virtual pipeline layout differs?")
        module, saved = unwrap(chunk), state[key]
        trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
        known = set(module.state_dict())
        missing = sorted(set(trainable) - set(saved))
        unexpected = sorted(k for k in saved if k not in known and not k.endswith("_extra_state"))
        if missing or unexpected:
            raise KeyError(f"--lora-load: {path} [{key}] does not hold this run's trainable parameters: missing "
                           f"{missing[:6]} ({len(missing)}), unexpected {unexpected[:6]} ({len(unexpected)}); give "
                           "the same --lora-target-modules as the run that saved it")
        shapes = [f"{n} {tuple(saved[n].shape)} vs {tuple(p.shape)}" for n, p in trainable.items()
                  if saved[n].shape != p.shape]
        if shapes:
            raise ValueError(f"--lora-load: {path} [{key}] has other shapes than this model (saved vs model: "
                             f"{shapes[:3]}): give the same --lora-r and parallel layout as the run that saved it")
        frozen = len([k for k in saved if k in known and k not in trainable])
        if frozen:  # a whole (not adapter-only) checkpoint: its frozen weights are the base's business
            logger.info("--lora-load %s [%s]: %d frozen tensors left out, the base weights come from --load",
                        path, key, frozen)
        module.load_state_dict({n: saved[n] for n in trainable}, strict=False)


def _set_rng_state(states: list) -> None:
    dp = parallel_state.get_data_parallel_world_size(with_context_parallel=True)
    if len(states) != dp:
        logger.warning("checkpoint holds RNG states of %d data-parallel ranks, this run has %d: not restored",
                       len(states), dp)
        return
    s = states[parallel_state.get_data_parallel_rank(with_context_parallel=True)]
    random.setstate(s["random_rng_state"])
    np.random.set_state(s["np_rng_state"])
    torch.set_rng_state(s["torch_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(s["rng_tracker_states"])
