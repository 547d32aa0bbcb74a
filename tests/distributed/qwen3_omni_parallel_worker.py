"""torchrun worker: the Qwen3-Omni thinker at PP=2 (deepstack additions crossing the stage boundary) and at
TP=2 with sequence parallelism equals one process (gloo on CPU, 2 ranks).

Weights: transformers' thinker (4 decoder layers, 3 deepstack layers) through the key table of
``tests/parity/test_qwen3_omni_thinker.py``. Two micro-batches: the five-row padded batch (image, video,
audio, image + audio, text only) and its text-only row alone, so the tensor a stage sends changes width
between micro-batches.

Phase 1 (one process per rank, PP=1): megatron's ``forward_backward_func`` over the two micro-batches
(the reference losses and gradients, load-balancing gradient included), and one plain forward/backward of
the padded batch (the TP reference).

Phase 2 (PP=2, ``text_decoder.pipeline_num_layers`` [1, 3]): stage 0 holds the encoders and decoder layer 0
and sends ``[s, b, h + 3h]`` (its hidden states, then the additions of layers 0..2); stage 1 splits the
additions off and adds blocks 1 and 2 after its layers 1 and 2 (and nothing after layer 3). The same
schedule (1F1B, shapes sent ahead as the omni task's variable lengths do) must give the reference's
per-micro-batch losses and every parameter's gradient (stage 1's layers renumbered to their global index);
stage 0's mergers of blocks 1 and 2 must get a gradient (it comes back only through the sent additions).

Phase 3 (TP=2 + SP, the decoder's tokens scattered over the ranks): the padded batch's logits, loss and
gradients (sequence-parallel parameters and the q/k norms summed over TP, as ``finalize_model_grads`` does).
"""

from __future__ import annotations

import re
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.pipeline_parallel import get_forward_backward_func

from mm_omni.parallel.decoder_layout import decoder_layout
from mm_omni.platform import get_platform
from mm_omni.training.omni_task import pipeline_overrides
from tests.distributed.text_tp_worker import gathered_grads, load_sharded
from tests.parity.test_qwen3_omni_thinker import (
    MODEL_KEYS, build_hf, build_mm, hf_positions, hf_to_mm, load_mm, make_batch, tiny_thinker_config,
)

TOL = 1e-5
LAYER = re.compile(r"^text_decoder\.decoder\.layers\.(\d+)\.")


def err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error; the absolute one where the reference is zero (a merger whose addition reaches no target)."""
    scale = ref.abs().max()
    return float((got - ref).abs().max() / scale) if scale > 0 else float(got.abs().max())


def micro_batches(batch: dict, pos: torch.Tensor) -> list[dict]:
    full = {k: batch[k] for k in MODEL_KEYS}
    text_only = {k: batch[k][4:5] for k in ("input_ids", "attention_mask", "labels")}
    return [dict(full, position_ids=pos), dict(text_only, position_ids=pos[:, 4:5])]


def schedule_step(data_iterator, model):
    """megatron's forward step: the loss on the last stage, the (possibly widened) hidden states before it."""
    out = model(**next(data_iterator))
    if out.loss is None:
        return out.hidden_states, None
    return out.loss, lambda loss: (loss, {"lm loss": loss.detach()})


def run_schedule(model, batches: list[dict]) -> tuple[list, dict]:
    from mm_omni.models.text.moe import load_balancing_losses

    load_balancing_losses(model.text_decoder.config.num_layers)  # a clean tracker
    model.zero_grad(set_to_none=True)
    model.model_type = ModelType.encoder_or_decoder  # what the training setup marks each chunk with
    config = model.config
    config.variable_seq_lengths = True  # as the omni task's training sets it: shapes are sent ahead
    config.batch_p2p_comm = False  # gloo: megatron's unbatched p2p (the training setup does the same)
    config.pipeline_dtype = torch.float32
    losses = get_forward_backward_func()(
        forward_step_func=schedule_step, data_iterator=iter(batches), model=model, num_microbatches=len(batches),
        seq_length=batches[0]["input_ids"].shape[1], micro_batch_size=batches[0]["input_ids"].shape[0],
        forward_only=False)
    return ([float(x["lm loss"]) for x in losses],
            {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()})


def run_plain(model, batch: dict, pos: torch.Tensor, **kwargs):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    model.zero_grad(set_to_none=True)
    out = model(position_ids=pos, return_logits=True, **{k: batch[k] for k in MODEL_KEYS}, **kwargs)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def global_name(name: str, offset: int) -> str:
    return LAYER.sub(lambda m: f"text_decoder.decoder.layers.{int(m.group(1)) + offset}.", name)


def check(errs: dict, rank: int, what: str) -> tuple[str, float]:
    worst = max(errs, key=errs.get)
    if not errs[worst] < TOL:
        raise AssertionError(f"rank {rank}: {worst} rel err {errs[worst]:.2e} ({what} vs one process)")
    return worst, errs[worst]


def main():
    get_platform()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    cfg = tiny_thinker_config(num_layers=4)
    hf = build_hf(cfg)
    batch = make_batch(cfg)
    pos = hf_positions(hf, batch)
    batches = micro_batches(batch, pos)
    assert batches[0]["pixel_values"] is not None and "pixel_values" not in batches[1]

    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    mm_cfg, ref = build_mm(cfg)
    load_mm(ref, hf_to_mm(cfg, hf.state_dict()))
    full = {n: p.detach().clone() for n, p in ref.named_parameters()}
    ref_losses, ref_grads = run_schedule(ref, batches)
    ref_plain = run_plain(ref, batch, pos)
    parallel_state.destroy_model_parallel()

    # -- PP=2, layers [1, 3]: the additions of layers 1 and 2 cross the boundary -----------------------------
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    pp_cfg = mm_cfg.model_copy(update={"text_decoder": mm_cfg.text_decoder.model_copy(
        update={"pipeline_num_layers": [1, 3]})})
    overrides = dict(pipeline_overrides(pp_cfg, 2, None), pipeline_dtype=torch.float32)
    first, last = rank == 0, rank == 1
    _, model = build_mm(cfg, pre_process=first, post_process=last, text_config_overrides=overrides)
    assert list(model.text_decoder.layer_range()) == ([0] if first else [1, 2, 3])
    offset = model.text_decoder.layer_range().start
    names = {n: global_name(n, offset) for n, _ in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(full[names[n]])
    losses, grads = run_schedule(model, batches)
    errs = {names[n]: err(g, ref_grads[names[n]]) for n, g in grads.items()}
    if last:
        errs.update({f"loss.{i}": err(torch.tensor(x), torch.tensor(y)) for i, (x, y) in
                     enumerate(zip(losses, ref_losses))})
        assert len(losses) == 2
    if first:  # the mergers whose additions are added on the other stage got their gradient back
        assert all(grads[f"image_encoder.deepstack_projectors.{k}.encoder.linear_fc2.weight"].abs().max() > 0
                   for k in (1, 2))
    worst = check(errs, rank, "PP=2")
    counts = [0, 0]
    dist.all_gather_object(counts, len(errs))
    if rank == 1:
        sys.stdout.write(f"QWEN3_OMNI_PP_OK worst {worst[0]} {worst[1]:.3e} checked {sum(counts) - 2} params "
                         f"+ 2 losses\n")
    parallel_state.destroy_model_parallel()

    # -- TP=2 + SP ---------------------------------------------------------------------------------------------
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    _, model = build_mm(cfg, text_config_overrides={"tensor_model_parallel_size": 2, "sequence_parallel": True})
    split = load_sharded(model, full, rank, world)
    logits, loss, grads = run_plain(model, batch, pos, layout=decoder_layout(model.text_decoder))
    grads = gathered_grads(model, grads, world)
    for n, p in model.named_parameters():
        if getattr(p, "sequence_parallel", False) or "q_layernorm" in n or "k_layernorm" in n:
            dist.all_reduce(grads[n])
    valid = batch["attention_mask"].bool()
    errs = {"logits": err(logits[valid], ref_plain[0][valid]), "loss": err(loss, ref_plain[1])}
    errs.update({n: err(g, ref_plain[2][n]) for n, g in grads.items()})
    worst = check(errs, rank, "TP=2 + SP")
    if rank == 0:
        sys.stdout.write(f"QWEN3_OMNI_TP_SP_OK worst {worst[0]} {worst[1]:.3e} checked {len(errs)} split {split}\n")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
