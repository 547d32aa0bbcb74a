"""``--cfg.test_convert_precision``: the converted checkpoint computes what the HF one computes.

Loads transformers' thinker from ``hf_dir`` and our ``OmniModel`` from the converted checkpoint
(TP shards merged back, so any layout is checked on one CPU process), both fp32, runs the same
short text-only input (the encoders take their dummy path) and compares the logits. This is the
one place the converter imports the training stack, and only when the option is on.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import torch

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


def check_precision(hf_dir: Path, mm_dir: Path, thinker, seq_len: int = 16) -> float:
    """Relative max error of our logits vs transformers'; raises above :data:`TOLERANCE`."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration

    from converters.qwen2_5_omni.converter import open_mm
    from mm_omni.config.model import from_hf_thinker_config
    from mm_omni.models.omni import OmniModel

    _init_single_process_megatron()
    hf = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    model = OmniModel(from_hf_thinker_config(thinker)).float().eval()
    reader = open_mm(mm_dir, thinker)
    state = {name: reader.get(name).float() for name in reader.names()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("._extra_state") for k in missing):
        raise KeyError(f"converted checkpoint does not fit OmniModel: missing {missing[:5]}, unexpected {unexpected[:5]}")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(thinker.text_config.vocab_size, 1000), (1, seq_len), generator=gen)
    pos = torch.arange(seq_len).view(1, 1, -1).expand(3, 1, -1)  # text only: the three M-RoPE axes agree
    with torch.no_grad():
        ref = hf(input_ids=ids, position_ids=pos).logits
        ours = model(input_ids=ids, position_ids=pos, return_logits=True).logits
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    log.info("test_convert_precision: text logits rel max error %.3g (tolerance %.0e)", err, TOLERANCE)
    if not err < TOLERANCE:
        raise AssertionError(f"converted checkpoint's logits differ from transformers': rel err {err:.3g}")
    return err
