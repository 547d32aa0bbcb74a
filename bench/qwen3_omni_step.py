"""Whole Qwen3-Omni thinker step, ours vs transformers, on the benchmark rows below (run it on a machine with a CUDA GPU).

Builds the Qwen3-Omni-30B-A3B thinker's widths at reduced depth: text ``--text-layers`` (4) MoE layers of hidden
2048, 32 query / 4 KV heads of 128, 128 experts of FFN 768, top-8 (``norm_topk_prob``), vocabulary 152064,
interleaved M-RoPE [24, 20, 20]; vision ``--vision-layers`` (8) of hidden 1152, patch 16, with three deepstack
mergers at the released taps (8, 16, 24 of 27) scaled into that depth; AuT audio ``--audio-layers`` (8) of
d_model 1280. Random weights in transformers' ``Qwen3OmniMoeThinkerForConditionalGeneration``, copied through the
converter's table (``converters.common.convert`` with ``mm_omni.models.qwen3_omni_moe.convert.SPEC``) into our
``Qwen3OmniModel``, built as the trainer builds it on one GPU (megatron's parallel state of world size 1, the
omni task's decoder overrides, cast to bf16; experts in ``GroupedExperts``: torch ``grouped_mm`` on CUDA bf16).
Both run fwd+bwd in bf16 on the same inputs and 3D positions (transformers' ``get_rope_index``, checked equal to
ours):

* reference row: a 448x448 image (196 merged tokens), 10 s of audio (130 tokens), 2048 text tokens;
* mixed batch: six rows of different lengths and media (:data:`MIXED`: text only, image, audio, image + audio),
  padded (attention mask) for transformers and ours, and packed into one row with ``cu_seqlens`` for ours;
  tokens/s and TFLOP/s count the real tokens only.

The loss each side trains with: transformers' LM loss plus, with ``--hf-router-logits on`` (default),
``router_aux_loss_coef`` x its load-balancing loss pooled over the layers (``output_router_logits``); ours the LM
loss, with megatron's per-layer load-balancing loss in the backward (``mm_omni.models.text.moe``; outside the
returned loss, gradient scale 1 as one micro-batch). The LM losses are compared (rel diff), each side's
load-balancing term is printed beside them (pooled vs mean of per-layer: not the same quantity).

Prints the parameter GiB of each side and what is left of the device for activations, then per row: ms/step,
tokens/s, TFLOP/s and MFU (model FLOPs of ``mm_omni.models.qwen3_omni_moe.flops``: experts by the top-k a token
runs through; against a bf16 8192^3 matmul measured in the same run), peak GiB (this side's parameters, gradients
and activations: the other model's parameters left out), a per-module breakdown (each module's fwd+bwd timed on
its own: vision encoder with its deepstack mergers, audio encoder, decoder incl. output layer and loss fed
embeddings, without the deepstack additions) and the speedup transformers / ours of each.

    python bench/qwen3_omni_step.py [--iters 10] [--rows ref,mixed] [--variants base,fused,graphs]
        [--text-layers 4] [--vision-layers 8] [--audio-layers 8] [--hf-router-logits on|off] [--smoke]
    python bench/qwen3_omni_step.py --lora-full-depth [--rows ref,mixed] [--lora-variants fused,mcore-dispatch]
    python bench/omni_step.py --family qwen3_omni_moe [the same arguments]
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mm_omni.platform import get_platform  # noqa: E402
from omni_step import VARIANTS, matmul_ceiling, measure, param_bytes, set_variant  # noqa: E402  (bench/omni_step.py)

# the released tokenizer's special token ids (tests/fixtures/qwen3_omni_moe.py: QWEN3_OMNI_SPECIAL_TOKENS)
IDS = dict(image_token_id=151655, video_token_id=151656, audio_token_id=151675, audio_start_token_id=151669,
           audio_end_token_id=151670, vision_start_token_id=151652, vision_end_token_id=151653)
PAD_ID = 151643  # <|endoftext|>
POSITION_ID_PER_SECONDS = 13  # the released config.json's (transformers' class default is 25)
TEXT = dict(hidden=2048, ffn=768, heads=32, groups=4, head_dim=128, experts=128, topk=8, moe_ffn=768,
            vocab=152064, layers=4, mrope=[24, 20, 20], theta=1e6, aux=0.001)
VISION = dict(hidden=1152, ffn=4304, heads=16, layers=8, patch=16, temporal=2, merge=2, positions=2304)
AUDIO = dict(hidden=1280, ffn=5120, heads=20, layers=8, mel=128, n_window=50, n_window_infer=800,
             conv_chunksize=500, downsample=480)
RELEASED_VISION_DEPTH, RELEASED_DEEPSTACK = 27, (8, 16, 24)
# (image side in pixels or None, audio seconds, text tokens incl. the media markers)
REF = (448, 10, 2048)
MIXED = [(None, 0, 1536), (448, 0, 1024), (None, 10, 768), (224, 5, 2048), (384, 20, 512), (None, 0, 384)]


def deepstack_indexes(depth: int) -> list[int]:
    """The released taps (8, 16, 24 of 27 layers) scaled into ``depth`` layers (8 -> [2, 5, 7])."""
    taps = sorted({min(depth - 1, round(i * depth / RELEASED_VISION_DEPTH)) for i in RELEASED_DEEPSTACK})
    if len(taps) != len(RELEASED_DEEPSTACK):
        raise SystemExit(f"--vision-layers {depth}: too few layers for {len(RELEASED_DEEPSTACK)} distinct deepstack "
                         "taps (use 4 or more)")
    return taps


def thinker_config():
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (
        Qwen3OmniMoeAudioEncoderConfig, Qwen3OmniMoeTextConfig, Qwen3OmniMoeThinkerConfig,
        Qwen3OmniMoeVisionEncoderConfig,
    )

    text = Qwen3OmniMoeTextConfig(
        vocab_size=TEXT["vocab"], hidden_size=TEXT["hidden"], intermediate_size=TEXT["ffn"],
        num_hidden_layers=TEXT["layers"], num_attention_heads=TEXT["heads"], num_key_value_heads=TEXT["groups"],
        head_dim=TEXT["head_dim"], rms_norm_eps=1e-6, max_position_embeddings=65536,
        rope_parameters={"rope_type": "default", "rope_theta": TEXT["theta"], "mrope_section": TEXT["mrope"],
                         "interleaved": True, "mrope_interleaved": True},
        moe_intermediate_size=TEXT["moe_ffn"], num_experts=TEXT["experts"], num_experts_per_tok=TEXT["topk"],
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=TEXT["aux"],
        attention_bias=False)
    vision = Qwen3OmniMoeVisionEncoderConfig(
        depth=VISION["layers"], hidden_size=VISION["hidden"], intermediate_size=VISION["ffn"],
        num_heads=VISION["heads"], in_channels=3, patch_size=VISION["patch"], temporal_patch_size=VISION["temporal"],
        spatial_merge_size=VISION["merge"], out_hidden_size=TEXT["hidden"],
        num_position_embeddings=VISION["positions"], deepstack_visual_indexes=deepstack_indexes(VISION["layers"]),
        hidden_act="gelu_pytorch_tanh")
    audio = Qwen3OmniMoeAudioEncoderConfig(
        num_mel_bins=AUDIO["mel"], encoder_layers=AUDIO["layers"], encoder_attention_heads=AUDIO["heads"],
        encoder_ffn_dim=AUDIO["ffn"], d_model=AUDIO["hidden"], output_dim=TEXT["hidden"],
        downsample_hidden_size=AUDIO["downsample"], n_window=AUDIO["n_window"],
        n_window_infer=AUDIO["n_window_infer"], conv_chunksize=AUDIO["conv_chunksize"], max_source_positions=1500)
    cfg = Qwen3OmniMoeThinkerConfig(
        text_config=text, vision_config=vision, audio_config=audio, image_token_id=IDS["image_token_id"],
        video_token_id=IDS["video_token_id"], audio_token_id=IDS["audio_token_id"],
        audio_start_token_id=IDS["audio_start_token_id"], position_id_per_seconds=POSITION_ID_PER_SECONDS,
        tie_word_embeddings=False)
    # not declared config fields; transformers' get_rope_index reads vision_start_token_id from the config
    cfg.vision_start_token_id, cfg.vision_end_token_id = IDS["vision_start_token_id"], IDS["vision_end_token_id"]
    cfg.audio_end_token_id = IDS["audio_end_token_id"]
    for sub in (cfg, cfg.text_config, cfg.vision_config, cfg.audio_config):
        sub._attn_implementation = "sdpa"
    return cfg


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
def _media_api(hf):
    """Where transformers' thinker keeps get_rope_index / get_image_features / get_audio_features: its inner
    ``model`` (5.2x), or the thinker itself (5.17, whose ``model`` is the text model)."""
    return hf.model if hasattr(hf.model, "get_image_features") else hf


def text_limit() -> int:
    """Ordinary text ids are drawn below this (the special ids sit above)."""
    return min(min(IDS.values()), PAD_ID)


def sample(px, seconds: float, n_text: int, gen) -> dict:
    """Token ids and media of one row: ``n_text`` text tokens (the media markers among them) around an optional
    ``px`` x ``px`` image and an optional ``seconds`` of audio (100 mel frames a second)."""
    from mm_omni.models.qwen3_omni_moe.rope_index import audio_token_count

    p, m = VISION["patch"], VISION["merge"]
    if px and px % (p * m):
        raise ValueError(f"image side {px}: not a multiple of patch x merge = {p * m} pixels")
    grid = [1, px // p, px // p] if px else None
    mel = int(round(seconds * 100))
    body = torch.randint(0, text_limit(), (n_text - 2 * (grid is not None) - 2 * (mel > 0),), generator=gen).tolist()
    half = len(body) // 2
    ids = body[:half]
    n_vis = grid[1] * grid[2] // m**2 if grid else 0
    if grid:
        ids += [IDS["vision_start_token_id"]] + [IDS["image_token_id"]] * n_vis + [IDS["vision_end_token_id"]]
    n_aud = audio_token_count(mel, AUDIO["n_window"]) if mel else 0
    if mel:
        ids += [IDS["audio_start_token_id"]] + [IDS["audio_token_id"]] * n_aud + [IDS["audio_end_token_id"]]
    ids += body[half:]
    width = 3 * VISION["temporal"] * p**2
    return dict(ids=ids, grid=grid, mel=mel, n_vis=n_vis, n_aud=n_aud,
                pixels=torch.randn(grid[1] * grid[2], width, generator=gen) if grid else None,
                feats=torch.randn(AUDIO["mel"], mel, generator=gen) if mel else None)


def our_positions(part: dict) -> torch.Tensor:
    from mm_omni.models.qwen3_omni_moe.rope_index import get_rope_index

    return get_rope_index(
        part["ids"], image_token_id=IDS["image_token_id"], video_token_id=IDS["video_token_id"],
        audio_token_id=IDS["audio_token_id"], vision_start_token_id=IDS["vision_start_token_id"],
        audio_start_token_id=IDS["audio_start_token_id"],
        image_grid_thw=torch.tensor([part["grid"]]) if part["grid"] else None,
        audio_seqlens=[part["mel"]] if part["mel"] else None, spatial_merge_size=VISION["merge"],
        position_id_per_seconds=POSITION_ID_PER_SECONDS, n_window=AUDIO["n_window"])


def make_batch(specs, hf, mm_cfg, dev, dtype, seed: int = 0) -> dict:
    """``specs`` (:data:`MIXED`'s form) as one padded batch ``[b, s_max]`` and as one packed row (cu_seqlens),
    with transformers' 3D positions (checked equal to ours row by row) and the model FLOPs of the real tokens.
    The grids and the masks stay on the host (the trainer keeps them there for our model)."""
    from mm_omni.models.qwen3_omni_moe.flops import qwen3_omni_batch_flops

    gen = torch.Generator().manual_seed(seed)
    parts = [sample(px, sec, n, gen) for px, sec, n in specs]
    lens = [len(p["ids"]) for p in parts]
    b, s_max = len(parts), max(lens)
    ids = torch.full((b, s_max), PAD_ID)
    mask = torch.zeros(b, s_max, dtype=torch.long)
    for i, p in enumerate(parts):
        ids[i, :lens[i]], mask[i, :lens[i]] = torch.tensor(p["ids"]), 1
    labels = torch.where((ids < text_limit()) & mask.bool(), ids, torch.full_like(ids, -100))
    with_img = [p for p in parts if p["grid"]]
    with_aud = [p for p in parts if p["mel"]]
    grids = torch.tensor([p["grid"] for p in with_img])
    mels = torch.tensor([p["mel"] for p in with_aud])
    feats = torch.zeros(len(with_aud), AUDIO["mel"], int(mels.max()))
    for i, p in enumerate(with_aud):
        feats[i, :, :p["mel"]] = p["feats"]
    fmask = (torch.arange(feats.shape[-1])[None] < mels[:, None]).long()
    if hf is not None:
        pos = _media_api(hf).get_rope_index(ids, grids, None, mask, False, mels, None)[0]  # [3, b, s_max], 0 on padding
        for i, p in enumerate(parts):
            if not torch.equal(our_positions(p), pos[:, i, :lens[i]].float()):
                raise RuntimeError(f"row {i}: mm_omni's get_rope_index differs from transformers'")
    else:  # ours alone (--lora-full-depth)
        pos = torch.zeros(3, b, s_max)
        for i, p in enumerate(parts):
            pos[:, i, :lens[i]] = our_positions(p)
    media = dict(pixel_values=torch.cat([p["pixels"] for p in with_img]).to(dev, dtype), image_grid_thw=grids,
                 input_features=feats.to(dev, dtype), feature_attention_mask=fmask)
    padded = dict(input_ids=ids.to(dev), attention_mask=mask if b > 1 else None, labels=labels.to(dev),
                  position_ids=pos.to(dev), **media)
    valid = mask.bool()
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    packed = dict(input_ids=ids[valid][None].to(dev), labels=labels[valid][None].to(dev),
                  position_ids=pos[:, valid][:, None].to(dev), cu_seqlens=cu.to(dev), **media)
    flops = step_flops(mm_cfg, lens, grids.tolist(), mels.tolist())
    counted = qwen3_omni_batch_flops(mm_cfg, dict(packed, cu_seqlens=cu))
    if not math.isclose(sum(flops.values()), counted, rel_tol=1e-9):
        raise RuntimeError(f"per-module FLOPs {sum(flops.values()):.4g} != the family's count {counted:.4g}")
    desc = "; ".join(" + ".join(([f"image {px}x{px} ({p['n_vis']} tok)"] if px else [])
                                + ([f"{sec:g} s audio ({p['n_aud']} tok)"] if sec else []) + [f"{n} text"])
                     + f" = {len(p['ids'])}" for (px, sec, n), p in zip(specs, parts))
    return dict(padded=padded, packed=packed, tokens=sum(lens), padded_tokens=b * s_max, flops=flops, desc=desc)


def step_flops(mm_cfg, lens, grids, mels) -> dict:
    """Model FLOPs of one fwd+bwd per module: the parts of the family's count (``--log-tps``'s MFU), experts
    by the top-k each token runs through."""
    from mm_omni.models.audio_aut.flops import aut_flops
    from mm_omni.models.text.flops import text_flops
    from mm_omni.models.vision_qwen3.flops import qwen3_vision_flops

    return {"vision": qwen3_vision_flops(mm_cfg.image_encoder.vision_encoder, mm_cfg.text_decoder.hidden_size, grids),
            "audio": aut_flops(mm_cfg.audio_encoder.audio_encoder, mels),
            "decoder": text_flops(mm_cfg.text_decoder, lens)}


# ------------------------------------------------------------------------------------------------
# the two models' steps
# ------------------------------------------------------------------------------------------------
class Side:
    """One model's step and its parts as closures over one batch (what ``omni_step.measure`` times)."""

    def __init__(self, name, model, batch: dict, hf: bool, router_logits: bool = True):
        self.name, self.model, self.hf, self.router_logits = name, model, hf, router_logits
        dev = batch["input_ids"].device
        if hf:  # transformers computes its vision and audio bookkeeping on the inputs' device
            self.kw = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
                       if k != "cu_seqlens"}
        else:  # ours takes the grids and the masks on the host, as the trainer hands them over
            self.kw = dict(batch)
        self.host_lens = batch["feature_attention_mask"].sum(-1)
        dtype = next(model.parameters()).dtype
        b, s = batch["input_ids"].shape
        h = TEXT["hidden"]
        g = torch.Generator(device=dev).manual_seed(7)
        shape = (b, s, h) if hf else (s, b, h)  # transformers' [b, s, h], megatron's [s, b, h]
        self.emb = torch.randn(*shape, device=dev, dtype=dtype, generator=g) * 0.02
        ids = batch["input_ids"]
        blocks = 1 + len(VISION["deepstack"])  # the merged features and each deepstack merger's, side by side
        self.gv = torch.randn(int((ids == IDS["image_token_id"]).sum()), h * blocks, device=dev, dtype=dtype,
                              generator=g)
        self.ga = torch.randn(int((ids == IDS["audio_token_id"]).sum()), h, device=dev, dtype=dtype, generator=g)

    def zero(self):
        self.model.zero_grad(set_to_none=True)

    def outputs(self):
        """(the loss the side trains with, its LM part, its load-balancing term or None)."""
        if self.hf:
            out = self.model(**self.kw, output_router_logits=self.router_logits)
            if not self.router_logits:
                return out.loss, out.loss, None
            aux = self.model.router_aux_loss_coef * out.aux_loss
            return out.loss, out.loss - aux, aux
        out = self.model(**self.kw)
        return out.loss, out.loss, None  # the load-balancing loss reaches the backward through megatron's router

    def step_loss(self):
        return self.outputs()[1]

    def step(self):
        self.zero()
        self.outputs()[0].backward()

    def aux_loss(self):
        """The load-balancing term of one forward as the side trains it (None: not trained)."""
        if self.hf:
            with torch.no_grad():
                aux = self.outputs()[2]
            return None if aux is None else float(aux)
        from mm_omni.models.text.moe import load_balancing_losses

        text = self.model.text_decoder.config
        load_balancing_losses(text.num_layers)  # clears what the timed steps left in megatron's tracker
        self.zero()
        # megatron records it only in a forward with autograd on; the backward releases the graphed encoders
        # (a graph's forward without its backward leaves that graph to eager calls)
        self.outputs()[0].backward()
        per_layer = load_balancing_losses(text.num_layers)
        return float(text.moe_aux_loss_coeff * per_layer.sum())

    def vision(self):
        self.zero()
        px, grid = self.kw["pixel_values"], self.kw["image_grid_thw"]
        if self.hf:
            out = _media_api(self.model).get_image_features(px, grid, return_dict=True)
            feats = torch.cat([torch.cat(out.pooler_output)] + [torch.cat(f) if isinstance(f, (list, tuple)) else f
                                                       for f in out.deepstack_features], -1)
        else:
            feats = self.model.image_encoder(px, grid)  # [n, h * (1 + deepstack)]
        feats.backward(self.gv)

    def audio(self):
        self.zero()
        feats = self.kw["input_features"]
        if self.hf:
            out = _media_api(self.model).get_audio_features(feats, feature_attention_mask=self.kw["feature_attention_mask"],
                                                return_dict=True).last_hidden_state
        else:
            out = self.model.audio_encoder(feats, self.host_lens)
        out.backward(self.ga)

    def decoder(self):
        self.zero()
        kw = self.kw
        emb = self.emb.detach().requires_grad_()
        if self.hf:
            loss = self.model(inputs_embeds=emb, attention_mask=kw.get("attention_mask"),
                              position_ids=kw["position_ids"], labels=kw["labels"],
                              output_router_logits=self.router_logits).loss
        else:
            loss = self.model.text_decoder(input_ids=kw["input_ids"], position_ids=kw["position_ids"],
                                           attention_mask=kw.get("attention_mask"), labels=kw["labels"],
                                           decoder_input=emb, cu_seqlens=kw.get("cu_seqlens")).loss
        loss.backward()


def measure_side(side: Side, other_bytes: int, iters: int) -> dict:
    res = measure(side, other_bytes, iters)
    res["aux"] = side.aux_loss()
    side.zero()
    return res


# ------------------------------------------------------------------------------------------------
# the models
# ------------------------------------------------------------------------------------------------
def build_models(dev, dtype):
    from megatron.core import tensor_parallel
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerForConditionalGeneration

    from converters.common.convert import hf_state_to_mm
    from mm_omni.models.qwen3_omni_moe.convert import SPEC
    from mm_omni.models.qwen3_omni_moe.hf_config import from_hf_thinker_config
    from mm_omni.models.qwen3_omni_moe.model import Qwen3OmniModel

    cfg = thinker_config()
    torch.manual_seed(0)
    with torch.device(dev):
        hf = Qwen3OmniMoeThinkerForConditionalGeneration(cfg)
    hf = hf.to(dev)  # buffers some versions create on the host
    # rotary inverse frequencies stay fp32, as from_pretrained(dtype=bf16) leaves them
    inv_freqs = {name: buf.float().clone() for name, buf in hf.named_buffers() if name.endswith("inv_freq")}
    hf = hf.to(dtype).train()
    for name, buf in inv_freqs.items():
        owner, _, leaf = name.rpartition(".")
        hf.get_submodule(owner)._buffers[leaf] = buf
    mm_cfg = from_hf_thinker_config(cfg)
    # as the omni task's model provider and model_setup.build_model make it on one GPU: the decoder's parallel
    # overrides, built on the host, every parameter cast to the training dtype, then moved; random init is
    # skipped (the weights come from transformers)
    overrides = dict(perform_initialization=False, tensor_model_parallel_size=1, sequence_parallel=False,
                     pipeline_dtype=dtype, calculate_per_token_loss=False, context_parallel_size=1,
                     expert_model_parallel_size=1, expert_tensor_parallel_size=1)
    ours = Qwen3OmniModel(mm_cfg, pre_process=True, post_process=True, vp_stage=None,
                          text_config_overrides=overrides)
    for p in ours.parameters():
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(p)
    ours = ours.to(dtype).to(dev).train()
    ours.config.params_dtype = ours.config.pipeline_dtype = dtype
    ours.config.bf16, ours.config.fp16 = dtype == torch.bfloat16, False
    state = hf_state_to_mm(SPEC, cfg, hf.state_dict())
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("._extra_state") for k in missing), missing
    del state
    return cfg, mm_cfg, hf, ours


def gib(n: float) -> float:
    return n / 2**30


def print_memory(hf, ours) -> tuple[int, int]:
    hf_bytes, our_bytes = param_bytes(hf), param_bytes(ours)
    dec = ours.text_decoder
    experts = sum(param_bytes(layer.mlp.experts) for layer in dec.decoder.layers)
    embed = param_bytes(dec.embedding) + param_bytes(dec.output_layer)
    print(f"params: transformers {gib(hf_bytes):.2f} GiB, ours {gib(our_bytes):.2f} GiB (ours: experts "
          f"{gib(experts):.2f}, embedding + output layer {gib(embed):.2f}, rest of the decoder "
          f"{gib(param_bytes(dec) - experts - embed):.2f}, vision {gib(param_bytes(ours.image_encoder)):.2f}, audio "
          f"{gib(param_bytes(ours.audio_encoder)):.2f})")
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        held = hf_bytes + our_bytes + max(hf_bytes, our_bytes)  # both models + one side's gradients
        print(f"device memory {gib(total):.0f} GiB: both models + one side's gradients {gib(held):.1f} GiB, "
              f"{gib(total - held):.0f} GiB left for activations")
    return hf_bytes, our_bytes


def print_table(title: str, batch: dict, res: dict, ceiling: float, base: str) -> None:
    flops = batch["flops"]
    total = sum(flops.values())
    print(f"\n{title}")
    print(f"  model FLOPs per step: vision {flops['vision'] / 1e12:.2f}, audio {flops['audio'] / 1e12:.2f}, "
          f"decoder {flops['decoder'] / 1e12:.2f} TFLOP (fwd+bwd, experts: top-{TEXT['topk']} of {TEXT['experts']})")
    print(f"  {'model':24s} {'ms/step':>8s} {'tokens/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak GiB':>9s} "
          f"{'vision ms':>10s} {'audio ms':>9s} {'decoder ms':>11s} {'LM loss':>9s} {'aux loss':>9s}")
    for name, r in res.items():
        aux = "-" if r["aux"] is None else f"{r['aux']:.2e}"
        print(f"  {name:24s} {r['step']:8.1f} {batch['tokens'] / r['step'] * 1e3:9.0f} {total / r['step'] / 1e9:8.1f} "
              f"{total / r['step'] / 1e9 / ceiling:6.1%} {r['peak']:9.1f} {r['vision']:10.2f} {r['audio']:9.2f} "
              f"{r['decoder']:11.2f} {r['loss']:9.5f} {aux:>9s}")
    t = res[base]
    for name, o in res.items():
        if name == base:
            continue
        rel = abs(o["loss"] - t["loss"]) / abs(t["loss"])
        print(f"  {name:24s} speedup: step {t['step'] / o['step']:.2f}x | vision {t['vision'] / o['vision']:.2f}x"
              f" | audio {t['audio'] / o['audio']:.2f}x | decoder {t['decoder'] / o['decoder']:.2f}x"
              f" | LM loss rel diff {rel:.1e} ({'within' if rel < 1e-2 else 'NOT within'} 1e-2)")
    last = list(res)[-1]
    o = res[last]
    print(f"  module TFLOP/s, {base} vs {last}: "
          + ", ".join(f"{p} {flops[p] / t[p] / 1e9:.1f} vs {flops[p] / o[p] / 1e9:.1f}"
                      for p in ("vision", "audio", "decoder")))


def lora_full_depth(args, dev, dtype, ceiling: float, rows: dict) -> None:
    """Ours alone at the released depth (text 48 MoE layers, vision 27, audio 32), LoRA rank ``--lora-r`` on every
    decoder linear (fused QKV, output projection, each expert's two linears), the bf16 base frozen (encoders
    too, as model_30b_a3b.json has them): fwd+bwd of the adapters' loss; tokens/s, executed TFLOP/s, MFU and
    peak memory. Executed FLOPs: the decoder's full fine-tuning count x 2/3 (no weight gradient of the frozen
    linears; the attention core's 3x is counted as 2x: an undercount) + the adapters' 6 N_lora per token (an
    expert's adapters for the top-k tokens it gets) + the
    encoders' forward (1/3 of their count)."""
    from megatron.core import tensor_parallel

    from mm_omni.lora.inject import apply_lora, freeze_base, lora_parameters
    from mm_omni.lora.targets import parse_targets
    from mm_omni.models.qwen3_omni_moe.hf_config import from_hf_thinker_config
    from mm_omni.models.qwen3_omni_moe.model import Qwen3OmniModel
    from timing import timeit

    if not args.smoke:
        TEXT["layers"], VISION["layers"], AUDIO["layers"] = 48, RELEASED_VISION_DEPTH, 32
        VISION["deepstack"] = list(RELEASED_DEEPSTACK)
    cfg = thinker_config()
    mm_cfg = from_hf_thinker_config(cfg)
    torch.manual_seed(0)
    # the decoder's parameters made on the device in bf16 by megatron's initialisation (30.5 B: no host copy)
    overrides = dict(perform_initialization=True, use_cpu_initialization=False, params_dtype=dtype,
                     tensor_model_parallel_size=1, sequence_parallel=False, pipeline_dtype=dtype,
                     calculate_per_token_loss=False, context_parallel_size=1, expert_model_parallel_size=1,
                     expert_tensor_parallel_size=1)
    ours = Qwen3OmniModel(mm_cfg, pre_process=True, post_process=True, vp_stage=None, text_config_overrides=overrides)
    for p in ours.parameters():
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(p)
    ours = ours.to(dtype).to(dev).train()
    ours.config.params_dtype = ours.config.pipeline_dtype = dtype
    ours.config.bf16, ours.config.fp16 = dtype == torch.bfloat16, False
    targets = [f"text_decoder.{t}" for t in ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")]
    found = apply_lora(ours, parse_targets(targets), args.lora_r, 2.0 * args.lora_r, 0.0, seed=0)
    freeze_base([ours])
    adapters = lora_parameters(ours)
    n_lora = sum(p.numel() for p in adapters.values())
    base = sum(p.numel() for p in ours.parameters()) - n_lora
    print(f"\nfull depth, LoRA r={args.lora_r} on {len(found['adapted'])} decoder linears "
          f"({sum('.local_experts.' in n for n in found['adapted'])} of them experts'): {base / 1e9:.2f} B frozen "
          f"parameters ({gib(param_bytes(ours)):.1f} GiB), {n_lora / 1e6:.1f} M trained; after build "
          f"{gib(torch.cuda.memory_allocated()) if torch.cuda.is_available() else 0:.1f} GiB allocated")
    print(f"  {'row, variant':22s} {'tokens':>7s} {'ms/step':>8s} {'tokens/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak GiB':>9s} "
          f"{'LM loss':>9s}")
    for kind, variant in [(k, v) for k in args.rows.split(",") for v in args.lora_variants.split(",")]:
        set_variant(ours, variant)
        batch = make_batch(rows[kind], None, mm_cfg, dev, dtype)
        side = Side("mm_omni", ours, batch["packed"], False)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        ms = timeit(side.step, args.iters)
        peak = gib(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else 0.0
        loss = float(side.step_loss())
        side.zero()
        f = batch["flops"]
        # per token: every adapter's A and B outside the experts, the top-k experts' of each MoE layer
        lora_fwd = sum(2 * p.numel() * (TEXT["topk"] / TEXT["experts"] if ".local_experts." in n else 1)
                       for n, p in adapters.items())
        executed = f["decoder"] * 2 / 3 + 3 * lora_fwd * batch["tokens"] + (f["vision"] + f["audio"]) / 3
        print(f"  {kind + ' ' + variant:22s} {batch['tokens']:7d} {ms:8.1f} {batch['tokens'] / ms * 1e3:9.0f} {executed / ms / 1e9:8.1f} "
              f"{executed / ms / 1e9 / ceiling:6.1%} {peak:9.1f} {loss:9.5f}")
    del ours


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    global PAD_ID
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rows", default="ref,mixed", help="any of ref, mixed (padded and packed)")
    parser.add_argument("--variants", default="base,fused,graphs", help=f"ours, any of {list(VARIANTS)}")
    parser.add_argument("--text-layers", type=int, default=TEXT["layers"], help="MoE decoder layers (3 or more)")
    parser.add_argument("--vision-layers", type=int, default=VISION["layers"])
    parser.add_argument("--audio-layers", type=int, default=AUDIO["layers"])
    parser.add_argument("--hf-router-logits", choices=("on", "off"), default="on",
                        help="transformers' output_router_logits: on adds its pooled load-balancing loss to the loss")
    parser.add_argument("--lora-full-depth", action="store_true",
                        help="ours alone at the released depth with LoRA on every decoder linear (no transformers)")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-variants", default="fused", help="with --lora-full-depth: any of fused, mcore-dispatch")
    parser.add_argument("--smoke", action="store_true", help="tiny widths, fp32 on the CPU: checks the script, not speed")
    args = parser.parse_args(argv)
    if args.text_layers < 3:
        raise SystemExit("--text-layers must be 3 or more: the three deepstack features go to decoder layers 0, 1, 2")
    TEXT["layers"], VISION["layers"], AUDIO["layers"] = args.text_layers, args.vision_layers, args.audio_layers
    VISION["deepstack"] = deepstack_indexes(args.vision_layers)
    rows = {"ref": [REF], "mixed": MIXED}
    if args.smoke:
        os.environ["MM_OMNI_DEVICE"] = "cpu"
        # the tiny tokenizer's ids (tests/fixtures/qwen3_omni_moe.py: TINY_QWEN3_OMNI_TOKEN_IDS), vocabulary 1024
        IDS.update(image_token_id=1000, video_token_id=1001, audio_token_id=1002, vision_start_token_id=1003,
                   vision_end_token_id=1004, audio_start_token_id=1005, audio_end_token_id=1006)
        PAD_ID = 1007
        TEXT.update(hidden=64, ffn=96, heads=4, groups=2, head_dim=32, experts=8, topk=2, moe_ffn=32, vocab=1024,
                    mrope=[6, 5, 5])
        VISION.update(hidden=32, ffn=44, heads=2, positions=36)
        AUDIO.update(hidden=32, ffn=44, heads=2, mel=16, downsample=8, n_window_infer=200, conv_chunksize=3)
        rows = {"ref": [(64, 1, 96)], "mixed": [(None, 0, 96), (64, 0, 64), (None, 1, 48), (32, 0.5, 80)]}
    elif get_platform().name != "cuda":
        raise SystemExit("bench/qwen3_omni_step.py needs a CUDA GPU (run it on a GPU machine)")
    import torch.distributed as dist
    import transformers
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group(get_platform().dist_backend, rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    dev, dtype = get_platform().device, (torch.float32 if args.smoke else torch.bfloat16)
    ceiling = matmul_ceiling(dev) if not args.smoke else 1.0
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU smoke run"
    print(f"GPU: {gpu} | torch {torch.__version__} | transformers {transformers.__version__}"
          f" | {dtype} fwd+bwd | 8192^3 bf16 matmul: {ceiling:.0f} TFLOP/s")
    if args.lora_full_depth:
        lora_full_depth(args, dev, dtype, ceiling, rows)
        dist.destroy_process_group()
        return
    cfg, mm_cfg, hf, ours = build_models(dev, dtype)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0, device=dev))  # one micro-batch: the aux gradient unscaled
    print(f"thinker: text {TEXT['layers']} MoE layers (hidden {TEXT['hidden']}, {TEXT['heads']}/{TEXT['groups']} "
          f"heads of {TEXT['head_dim']}, {TEXT['experts']} experts top-{TEXT['topk']} of FFN {TEXT['moe_ffn']}, vocab "
          f"{TEXT['vocab']}); vision {VISION['layers']} layers (hidden {VISION['hidden']}, deepstack "
          f"{VISION['deepstack']}); audio {AUDIO['layers']} layers (d_model {AUDIO['hidden']}, n_window "
          f"{AUDIO['n_window']}, n_window_infer {AUDIO['n_window_infer']})")
    router = args.hf_router_logits == "on"
    experts_impl = getattr(cfg.text_config, "_experts_implementation", None)
    print(f"  transformers: attention {cfg.text_config._attn_implementation}, experts {experts_impl}, "
          f"output_router_logits={router} (loss = LM" + (f" + {TEXT['aux']} x load-balancing loss pooled over "
                                                         "the layers)" if router else "; no load-balancing loss)"))
    from mm_omni.models.common.experts import grouped_mm_available

    experts = ours.text_decoder.decoder.layers[0].mlp.experts
    grouped = grouped_mm_available() and dtype == torch.bfloat16 and torch.device(dev).type == "cuda"
    print(f"  mm_omni: experts {type(experts).__name__} ({'torch grouped_mm' if grouped else 'one GEMM pair per expert'}"
          f"), megatron's per-layer load-balancing loss in the backward (moe_aux_loss_coeff "
          f"{mm_cfg.text_decoder.moe_aux_loss_coeff:.3g} = {TEXT['aux']} x top-k / layers)")
    hf_bytes, our_bytes = print_memory(hf, ours)
    variants = args.variants.split(",")
    for name in variants:
        print(f"  mm_omni[{name}]: {VARIANTS[name]}")

    for kind in args.rows.split(","):
        batch = make_batch(rows[kind], hf, mm_cfg, dev, dtype)
        res = {}
        if kind == "ref":
            res["transformers"] = measure_side(Side("transformers", hf, batch["padded"], True, router), our_bytes,
                                               args.iters)
            for name in variants:
                set_variant(ours, name)
                res[f"mm_omni[{name}]"] = measure_side(Side(name, ours, batch["padded"], False), hf_bytes, args.iters)
            title = f"reference row: {batch['desc']} tokens"
            print_table(title, batch, res, ceiling, "transformers")
        else:
            res["transformers padded"] = measure_side(Side("transformers", hf, batch["padded"], True, router),
                                                      our_bytes, args.iters)
            for name in variants:
                set_variant(ours, name)
                for layout in ("padded", "packed"):
                    res[f"mm_omni[{name}] {layout}"] = measure_side(Side(name, ours, batch[layout], False), hf_bytes,
                                                                    args.iters)
            title = (f"mixed batch, {len(rows[kind])} rows: {batch['desc']}\n  {batch['tokens']} tokens "
                     f"({batch['padded_tokens']} padded); tokens/s and TFLOP/s count real tokens")
            print_table(title, batch, res, ceiling, "transformers padded")
        set_variant(ours, "fused")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
