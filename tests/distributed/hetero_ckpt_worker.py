"""torchrun worker (2 ranks): an ``mm-convert`` checkpoint with ``tp_size 2``, ``vit_tp_size 1``,
``audio_tp_size 1`` loads into the hetero layout (decoder TP2, encoders tp=1 splitting the media over
the TP group) and gives transformers' logits.

argv: mm_dir hf_dir. The converter's model.json carries the per-module tp keys; every rank loads its
own ``release/mp_rank_0{tp}`` file strictly (full encoders, its half of the decoder).
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
from mm_omni.parallel.hetero import HeteroEncoders
from mm_omni.platform import get_platform
from tests.helpers import rel_err
from tests.parity.test_thinker import MODEL_KEYS, hf_positions, make_batch, mm_positions

TOL = 1e-5


def _fp32(node):
    if isinstance(node, dict):
        return {k: ("fp32" if k == "params_dtype" else False if k in ("bf16", "fp16") else _fp32(v))
                for k, v in node.items()}
    return node


def main() -> None:
    mm_dir, hf_dir = Path(sys.argv[1]), sys.argv[2]
    get_platform()
    dist.init_process_group("gloo")
    cfg = OmniModelConfig.model_validate(_fp32(json.loads((mm_dir / "model.json").read_text())))
    assert (cfg.text_decoder.tp, cfg.image_encoder.tp, cfg.audio_encoder.tp) == (2, 1, 1), "converter's tp keys"
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=cfg.text_decoder.tp)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    hetero = HeteroEncoders(cfg)
    overrides = dict(tensor_model_parallel_size=cfg.text_decoder.tp, pipeline_dtype=torch.float32)
    model = hetero.build_model(OmniModel, cfg, text_config_overrides=overrides).eval()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    state = torch.load(mm_dir / "release" / f"mp_rank_{tp_rank:02d}" / "model_optim_rng.pt", weights_only=True)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)

    from transformers import AutoConfig
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniForConditionalGeneration

    batch = make_batch(AutoConfig.from_pretrained(hf_dir).thinker_config)
    with torch.no_grad():
        out = model(position_ids=mm_positions(cfg, batch), return_logits=True, **{k: batch[k] for k in MODEL_KEYS})
        hf = Qwen2_5OmniForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32,
                                                                 attn_implementation="sdpa").thinker.eval()
        ref = hf(position_ids=hf_positions(hf, batch),
                 **{k: batch[k] for k in MODEL_KEYS if k != "use_audio_in_video"}).logits
    valid = batch["attention_mask"].bool()
    err = rel_err(out.logits[valid], ref[valid])
    if err >= TOL:
        raise AssertionError(f"hetero rank {dist.get_rank()}: logits rel err {err:.2e} vs transformers")
    stats = {k: v[0] for k, v in hetero.dispatch.stats.items()}
    sys.stdout.write(f"HETERO_CKPT_OK rank {dist.get_rank()} logits rel err {err:.3e} split calls {stats}\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
