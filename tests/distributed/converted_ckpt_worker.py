"""torchrun worker: a checkpoint written by ``mm-convert hf_to_mm`` at TP=2 or PP=2 gives transformers' logits.

argv: mm_dir hf_dir mode (tp2 | pp2). Each rank builds its part of our model (fp32), loads its own
``release/mp_rank_*`` file as written by the converter, and runs the thinker batch of
``tests/parity/test_thinker.py``; with PP=2 the first stage's hidden states go to the second by
send/recv. The last stage compares its logits with transformers' on the original HF checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from mm_omni.config.model import OmniModelConfig
from mm_omni.models.omni import OmniModel
from mm_omni.platform import get_platform
from mm_omni.checkpoint.format import rank_dir_name
from mm_omni.training.omni_task import pipeline_overrides
from tests.helpers import rel_err
from tests.parity.test_thinker import MODEL_KEYS, hf_positions, make_batch, mm_positions

TOL = 1e-5


def fp32_config(path: Path) -> OmniModelConfig:
    """The converter's model.json with every module computing in fp32 (the checkpoint is bf16)."""
    def fp32(node):
        if isinstance(node, dict):
            return {k: ("fp32" if k == "params_dtype" else False if k in ("bf16", "fp16") else fp32(v))
                    for k, v in node.items()}
        return node
    return OmniModelConfig.model_validate(fp32(json.loads(path.read_text())))


def reference_logits(hf_dir: str, batch: dict) -> torch.Tensor:
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniForConditionalGeneration

    hf = Qwen2_5OmniForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32,
                                                             attn_implementation="sdpa").thinker.eval()
    pos = hf_positions(hf, batch)
    with torch.no_grad():
        return hf(position_ids=pos, **{k: batch[k] for k in MODEL_KEYS if k != "use_audio_in_video"}).logits


def main():
    mm_dir, hf_dir, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    get_platform()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tp, pp = (2, 1) if mode == "tp2" else (1, 2)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    cfg = fp32_config(mm_dir / "model.json")
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    first, last = pp_rank == 0, pp_rank == pp - 1
    overrides = dict(pipeline_overrides(cfg, pp, None), tensor_model_parallel_size=tp, pipeline_dtype=torch.float32)
    model = OmniModel(cfg, pre_process=first, post_process=last, text_config_overrides=overrides).eval()

    path = mm_dir / "release" / rank_dir_name(parallel_state.get_tensor_model_parallel_rank(), pp_rank, pp) / \
        "model_optim_rng.pt"
    missing, unexpected = model.load_state_dict(torch.load(path, weights_only=True)["model"], strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (path, missing, unexpected)

    from transformers import AutoConfig

    thinker_cfg = AutoConfig.from_pretrained(hf_dir).thinker_config
    batch = make_batch(thinker_cfg)
    inputs = {k: batch[k] for k in MODEL_KEYS}
    pos = mm_positions(cfg, batch)
    with torch.no_grad():
        if not first:
            b, s = batch["input_ids"].shape
            hidden = torch.empty(s, b, cfg.text_decoder.hidden_size)
            dist.recv(hidden, src=rank - 1)
            model.set_input_tensor(hidden)
        out = model(position_ids=pos, return_logits=True, **inputs)
        if not last:
            dist.send(out.hidden_states.contiguous(), dst=rank + 1)
            return
    valid = batch["attention_mask"].bool()
    err = rel_err(out.logits[valid], reference_logits(hf_dir, batch)[valid])
    if err >= TOL:
        raise AssertionError(f"{mode} rank {rank}: logits rel err {err:.2e} vs transformers")
    sys.stdout.write(f"CONVERTED_{mode.upper()}_OK rank {rank} logits rel err {err:.3e}\n")


if __name__ == "__main__":
    main()
