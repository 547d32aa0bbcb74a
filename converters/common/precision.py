"""``--cfg.test_convert_precision``: the converted checkpoint computes what the HF one computes.

Loads transformers' model (the spec's ``hf_model``) from ``hf_dir`` and ours (the spec's
``precision.model``) from the converted checkpoint (TP shards merged back, so any layout is checked on
one CPU process), both fp32, and compares what the family's ``precision.compare`` returns for its probe:
one row with every modality the model reads (ids outside the special tokens), per module. This is the
one place the converter imports the training stack, and only when the option is on.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import torch

from converters.common.plan import Plan

log = logging.getLogger(__name__)
TOLERANCE = 1e-4  # fp32, different kernels (SDPA vs eager softmax order): relative max-abs error


def _init_single_process_megatron() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from mm_omni.platform import get_platform

    get_platform()
    if not dist.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def check_precision(plan: Plan, hf_dir: Path, mm_dir: Path) -> float:
    """Largest per-module relative max error of ours vs transformers'; raises above :data:`TOLERANCE`."""
    from converters.common.converter import open_mm

    precision = plan.spec.precision
    _init_single_process_megatron()
    hf = plan.spec.load_hf_model_class().from_pretrained(hf_dir, dtype=torch.float32).eval()
    model = precision.model(plan.cfg).float().eval()
    reader = open_mm(plan, mm_dir)
    state = {name: reader.get(name).float() for name in reader.names()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("._extra_state") for k in missing):
        raise KeyError(f"converted checkpoint does not fit our model: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        pairs = precision.compare(hf, model, plan.cfg, torch.Generator().manual_seed(0))
        errors = {module: _rel(ours, ref) for module, (ours, ref) in pairs.items()}
    for module, err in errors.items():
        log.info("test_convert_precision: %s rel max error %.3g (tolerance %.0e)", module, err, TOLERANCE)
    bad = {m: e for m, e in errors.items() if not e < TOLERANCE}
    if bad:
        raise AssertionError("converted checkpoint's outputs differ from transformers': "
                             + ", ".join(f"{m} rel err {e:.3g}" for m, e in bad.items()))
    return max(errors.values())
