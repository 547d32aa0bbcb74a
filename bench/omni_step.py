"""Whole thinker step, ours vs transformers, on the benchmark rows below (run it on a machine with a CUDA GPU).

Builds Qwen2.5-Omni 7B widths at reduced depth (text 4 layers, vision 8 with full attention in
layer 7, audio 8), random weights in transformers' ``Qwen2_5OmniThinkerForConditionalGeneration``,
copies them through the converter's table (``converters.common.convert``) into our ``OmniModel`` and runs, in bf16,
fwd+bwd on the same inputs for both:

* reference row: a 448x448 image (256 merged tokens), 10 s of audio (250 tokens), 2048 text tokens;
* encoder-heavy row: a 16-frame 448x448 video (2048 tokens), 30 s of audio (750 tokens), 512 text;
* mixed batch: six rows of different lengths and media (:data:`MIXED`), padded (attention mask) for
  transformers and ours, and packed into one row with ``cu_seqlens`` for ours: tokens/s of each.

Prints ms/step, tokens/s, TFLOP/s, MFU (against a bf16 8192^3 matmul measured in the same run),
peak GiB, the ratio, a per-module breakdown (each module's fwd+bwd timed on its own: vision
encoder, audio encoder, decoder incl. output layer and loss) and both losses.

    python bench/omni_step.py [--iters 10] [--rows ref,heavy,mixed] [--variants base,fused,graphs]

``--family qwen3_omni_moe`` runs the Qwen3-Omni-30B-A3B thinker's benchmark instead
(bench/qwen3_omni_step.py, with the arguments that follow; its own ``--help`` lists them).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mm_omni.platform import get_platform, synchronize  # noqa: E402
from timing import timeit  # noqa: E402  (bench/timing.py)

# Qwen2.5-Omni-7B special token ids
IDS = dict(image_token_index=151655, video_token_index=151656, audio_token_index=151646,
           vision_start_token_id=151652, vision_end_token_id=151653,
           audio_start_token_id=151647, audio_end_token_id=151648)
TEXT = dict(hidden=3584, ffn=18944, heads=28, groups=4, vocab=152064, layers=4, mrope=[16, 24, 24])
VISION = dict(hidden=1280, ffn=3420, heads=16, layers=8, patch=14, merge=2, temporal=2, window=112)
AUDIO = dict(hidden=1280, ffn=5120, heads=20, layers=8, mel=128, n_window=100)


def thinker_config():
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniThinkerConfig

    text = dict(vocab_size=TEXT["vocab"], hidden_size=TEXT["hidden"], intermediate_size=TEXT["ffn"],
                num_hidden_layers=TEXT["layers"], num_attention_heads=TEXT["heads"],
                num_key_value_heads=TEXT["groups"], rms_norm_eps=1e-6, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": TEXT["mrope"]},
                tie_word_embeddings=False)
    vision = dict(depth=VISION["layers"], hidden_size=VISION["hidden"], intermediate_size=VISION["ffn"],
                  num_heads=VISION["heads"], in_channels=3, patch_size=VISION["patch"],
                  spatial_merge_size=VISION["merge"], temporal_patch_size=VISION["temporal"],
                  window_size=VISION["window"], out_hidden_size=TEXT["hidden"],
                  fullatt_block_indexes=[VISION["layers"] - 1], hidden_act="silu")
    audio = dict(num_mel_bins=AUDIO["mel"], encoder_layers=AUDIO["layers"], encoder_attention_heads=AUDIO["heads"],
                 encoder_ffn_dim=AUDIO["ffn"], d_model=AUDIO["hidden"], max_source_positions=1500,
                 n_window=AUDIO["n_window"], output_dim=TEXT["hidden"])
    cfg = Qwen2_5OmniThinkerConfig(text_config=text, vision_config=vision, audio_config=audio, **IDS)
    cfg._attn_implementation = "sdpa"
    for sub in (cfg.text_config, cfg.vision_config, cfg.audio_config):
        sub._attn_implementation = "sdpa"
    return cfg


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
def row_parts(grid, video: bool, seconds: float, n_text: int, mm_cfg, gen) -> dict:
    """Token ids, 3D positions (ours, equal to transformers'), media of one row: ``n_text`` text tokens
    around an optional image/video of ``grid`` (t, h, w patches) and an optional ``seconds`` of audio."""
    from mm_omni.models.rope_index import audio_token_count, get_rope_index

    mel = int(seconds * 100)
    body = torch.randint(0, 150000, (n_text - 2 * (grid is not None) - 2 * (mel > 0),), generator=gen).tolist()
    half = len(body) // 2
    ids = body[:half]
    if grid is not None:
        n_vis = grid[0] * grid[1] * grid[2] // VISION["merge"] ** 2
        vis_tok = IDS["video_token_index"] if video else IDS["image_token_index"]
        ids += [IDS["vision_start_token_id"]] + [vis_tok] * n_vis + [IDS["vision_end_token_id"]]
    if mel:
        ids += [IDS["audio_start_token_id"]] + [IDS["audio_token_index"]] * audio_token_count(mel) + [IDS["audio_end_token_id"]]
    ids += body[half:]
    grid_t = torch.tensor([grid]) if grid is not None else None
    pos = get_rope_index(
        ids, image_token_id=IDS["image_token_index"], video_token_id=IDS["video_token_index"],
        audio_token_id=IDS["audio_token_index"], image_grid_thw=None if video else grid_t,
        video_grid_thw=grid_t if video else None, video_second_per_grid=[1.0] if video else None,
        audio_seqlens=[mel] if mel else None, spatial_merge_size=VISION["merge"],
        position_id_per_seconds=mm_cfg.position_id_per_seconds, seconds_per_chunk=mm_cfg.seconds_per_chunk,
    )
    width = 3 * VISION["temporal"] * VISION["patch"] ** 2
    pixels = torch.randn(grid[0] * grid[1] * grid[2], width, generator=gen) if grid is not None else None
    feats = torch.randn(AUDIO["mel"], mel, generator=gen) if mel else None
    return dict(ids=ids, pos=pos, grid=grid_t, pixels=pixels, feats=feats, mel=mel, video=video)


def make_row(kind: str, mm_cfg, dev, dtype, seed: int = 0) -> dict:
    """One benchmark row (reference or encoder-heavy, docs/performance.md) with its media, labels and 3D positions."""
    gen = torch.Generator().manual_seed(seed)
    side = 448 // VISION["patch"]  # 32 patches a side
    if kind == "ref":
        grid, video, seconds, n_text = [1, side, side], False, 10, 2048
    else:
        grid, video, seconds, n_text = [16 // VISION["temporal"], side, side], True, 30, 512
    part = row_parts(grid, video, seconds, n_text, mm_cfg, gen)
    ids, mel = part["ids"], part["mel"]
    input_ids = torch.tensor([ids])
    labels = torch.where(input_ids < 150000, input_ids, torch.full_like(input_ids, -100))
    row = dict(input_ids=input_ids.to(dev), labels=labels.to(dev), position_ids=part["pos"][:, None].to(dev),
               input_features=part["feats"][None].to(dev, dtype),
               feature_attention_mask=torch.ones(1, mel, dtype=torch.long, device=dev))
    if video:
        row.update(pixel_values_videos=part["pixels"].to(dev, dtype), video_grid_thw=part["grid"])
    else:
        row.update(pixel_values=part["pixels"].to(dev, dtype), image_grid_thw=part["grid"])
    n_vis = part["grid"].prod().item() // VISION["merge"] ** 2
    row["tokens"] = len(ids)
    row["flops"] = step_flops(mm_cfg, len(ids), grid, mel)
    row["desc"] = (f"{'16-frame video' if video else 'image'} 448x448 ({n_vis} tok) + {seconds} s audio "
                   f"({(ids.count(IDS['audio_token_index']))} tok) + {n_text} text = {len(ids)} tokens")
    return row


# (image side in pixels or None, audio seconds, text tokens): mixed sizes, as a real batch has
MIXED = [(None, 0, 1536), (448, 0, 1024), (None, 10, 768), (224, 5, 2048), (336, 20, 512), (None, 0, 384)]


def make_mixed(mm_cfg, dev, dtype, seed: int = 0) -> dict:
    """:data:`MIXED` as one padded batch ``[b, s_max]`` (attention mask) and as one packed row (cu_seqlens)."""
    gen = torch.Generator().manual_seed(seed)
    parts = [row_parts([1, px // VISION["patch"], px // VISION["patch"]] if px else None, False, sec, n, mm_cfg, gen)
             for px, sec, n in MIXED]
    lens = [len(p["ids"]) for p in parts]
    s_max, pad = max(lens), 151643  # <|endoftext|>
    ids = torch.full((len(parts), s_max), pad)
    mask = torch.zeros(len(parts), s_max, dtype=torch.long)
    pos = torch.zeros(3, len(parts), s_max, dtype=torch.long)
    for i, p in enumerate(parts):
        ids[i, : lens[i]] = torch.tensor(p["ids"])
        mask[i, : lens[i]] = 1
        pos[:, i, : lens[i]] = p["pos"]
    labels = torch.where((ids < 150000) & (mask > 0), ids, torch.full_like(ids, -100))
    with_img = [p for p in parts if p["pixels"] is not None]
    with_aud = [p for p in parts if p["feats"] is not None]
    t_max = max(p["mel"] for p in with_aud)
    feats = torch.zeros(len(with_aud), AUDIO["mel"], t_max)
    fmask = torch.zeros(len(with_aud), t_max, dtype=torch.long)
    for i, p in enumerate(with_aud):
        feats[i, :, : p["mel"]] = p["feats"]
        fmask[i, : p["mel"]] = 1
    media = dict(pixel_values=torch.cat([p["pixels"] for p in with_img]).to(dev, dtype),
                 image_grid_thw=torch.cat([p["grid"] for p in with_img]),
                 input_features=feats.to(dev, dtype), feature_attention_mask=fmask.to(dev))
    padded = dict(input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev),
                  position_ids=pos.to(dev), **media)
    valid = mask.bool()
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    packed = dict(input_ids=ids[valid][None].to(dev), labels=labels[valid][None].to(dev),
                  position_ids=pos[:, valid][:, None].to(dev), cu_seqlens=cu.to(dev), **media)
    desc = ", ".join(f"{'%dpx image + ' % px if px else ''}{'%g s audio + ' % sec if sec else ''}{n} text"
                     for px, sec, n in MIXED)
    return dict(padded=padded, packed=packed, tokens=sum(lens), padded_tokens=len(parts) * s_max, desc=desc)


def measure_mixed(hf, ours, batch: dict, iters: int) -> dict:
    """ms/step, peak GiB and loss of transformers (padded) and ours (padded, packed) on one mixed batch."""
    def step_fn(model, kw, is_hf):
        kw = dict(kw)
        if not is_hf:  # ours takes the grids and the audio mask on the host, as the collator makes them
            kw["feature_attention_mask"] = kw["feature_attention_mask"].cpu()
        else:
            kw["image_grid_thw"] = kw["image_grid_thw"].to(kw["input_ids"].device)

        def loss():
            return model(**kw).loss

        def step():
            model.zero_grad(set_to_none=True)
            loss().backward()
        return loss, step

    out = {}
    for name, model, kw, is_hf in (("transformers padded", hf, batch["padded"], True),
                                   ("mm_omni padded", ours, batch["padded"], False),
                                   ("mm_omni packed", ours, batch["packed"], False)):
        loss, step = step_fn(model, kw, is_hf)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        res = {"step": timeit(step, iters)}
        res["peak"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        with torch.no_grad():
            res["loss"] = float(loss())
        model.zero_grad(set_to_none=True)
        out[name] = res
    return out


def step_flops(mm_cfg, seq: int, grid, mel: int) -> dict:
    """Model FLOPs of one fwd+bwd per module (each stack's flops module: what --log-tps's MFU counts)."""
    from mm_omni.models.audio.flops import audio_flops
    from mm_omni.models.text.flops import text_flops
    from mm_omni.models.vision.flops import vision_flops

    block = mm_cfg.image_encoder
    return {"vision": vision_flops(block.vision_encoder, block.vision_projector, mm_cfg.text_decoder.hidden_size, [grid]),
            "audio": audio_flops(mm_cfg.audio_encoder.audio_encoder, [mel]),
            "decoder": text_flops(mm_cfg.text_decoder, [seq])}


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def matmul_ceiling(dev) -> float:
    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms = timeit(lambda: a @ b, 20, warmup=5)
    return 2 * n**3 / ms / 1e9  # TFLOP/s


def _pooled(out) -> torch.Tensor:
    """transformers' encoder outputs across versions: tensor, ModelOutput or a tuple of per-item tensors."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("pooler_output", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            return torch.cat(list(value)) if isinstance(value, (list, tuple)) else value
    if isinstance(out, (list, tuple)):
        return torch.cat(list(out))
    raise TypeError(type(out))


class Side:
    """One model's step and its parts as closures over one row."""

    def __init__(self, name, model, row, hf: bool):
        self.name, self.model, self.row, self.hf = name, model, row, hf
        dev = row["input_ids"].device
        self.video = "pixel_values_videos" in row
        s = row["tokens"]
        g = torch.Generator(device=dev).manual_seed(7)
        dtype = next(model.parameters()).dtype
        self.host_mask = row["feature_attention_mask"].cpu()
        self.emb = (torch.randn(s, TEXT["hidden"], device=dev, dtype=dtype, generator=g) * 0.02)
        self.gv = torch.randn(self._n_vis(), TEXT["hidden"], device=dev, dtype=dtype, generator=g)
        self.ga = torch.randn(int((row["input_ids"] == IDS["audio_token_index"]).sum()), TEXT["hidden"],
                              device=dev, dtype=dtype, generator=g)

    def _n_vis(self):
        tok = IDS["video_token_index"] if self.video else IDS["image_token_index"]
        return int((self.row["input_ids"] == tok).sum())

    def zero(self):
        self.model.zero_grad(set_to_none=True)

    def step_loss(self):
        r = self.row
        kw = {k: r[k] for k in ("input_ids", "labels", "position_ids", "input_features", "feature_attention_mask",
                                "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw") if k in r}
        if not self.hf:  # ours takes grid_thw and the audio mask on the host, as the collator makes them
            kw["feature_attention_mask"] = self.host_mask
        if self.hf:  # transformers computes the vision positions on grid_thw's device
            kw.update({k: kw[k].to(self.emb.device) for k in ("image_grid_thw", "video_grid_thw") if k in kw})
            if self.video:
                kw["video_second_per_grid"] = torch.tensor([1.0], device=self.emb.device)
        return self.model(**kw).loss

    def step(self):
        self.zero()
        self.step_loss().backward()

    def vision(self):
        self.zero()
        r = self.row
        px = r["pixel_values_videos"] if self.video else r["pixel_values"]
        grid = r["video_grid_thw"] if self.video else r["image_grid_thw"]
        if self.hf:
            fn = self.model.get_video_features if self.video else self.model.get_image_features
            out = _pooled(fn(px, grid.to(px.device)))
        else:
            out = self.model.image_encoder(px, grid)
        out.backward(self.gv)

    def audio(self):
        self.zero()
        r = self.row
        if self.hf:
            out = _pooled(self.model.get_audio_features(r["input_features"],
                                                        feature_attention_mask=r["feature_attention_mask"]))
        else:
            out = self.model.audio_encoder(r["input_features"], self.host_mask.sum(-1))
        out.backward(self.ga)

    def decoder(self):
        self.zero()
        r = self.row
        emb = self.emb.detach().requires_grad_()
        if self.hf:
            loss = self.model(inputs_embeds=emb[None], position_ids=r["position_ids"], labels=r["labels"]).loss
        else:
            loss = self.model.text_decoder(input_ids=r["input_ids"], position_ids=r["position_ids"],
                                           labels=r["labels"], decoder_input=emb[:, None]).loss
        loss.backward()


def profile_step(side: "Side", path: str) -> None:
    """Kernel table (CUDA time) of two steps; the top rows are printed, the whole table saved."""
    from torch.profiler import ProfilerActivity, profile

    side.step()
    synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            side.step()
        synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(table)
    print(f"\n  top kernels, {side.name} (2 steps), full table in {path}")
    print("\n".join(table.splitlines()[:18]))


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure(side: Side, other_bytes: int, iters: int) -> dict:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    res = {"step": timeit(side.step, iters)}
    res["peak"] = (torch.cuda.max_memory_allocated() - other_bytes) / 2**30 if cuda else 0.0
    with torch.no_grad():
        res["loss"] = float(side.step_loss())
    for part in ("vision", "audio", "decoder"):
        res[part] = timeit(getattr(side, part), iters)
    side.zero()
    return res


def build_models(dev, dtype):
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration

    from converters.common.convert import hf_state_to_mm
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config
    from mm_omni.models.omni import OmniModel

    cfg = thinker_config()
    torch.manual_seed(0)
    with torch.device(dev):
        hf = Qwen2_5OmniThinkerForConditionalGeneration(cfg)
    hf = hf.to(dev)  # buffers some versions create on the host
    # rotary inverse frequencies stay fp32, as from_pretrained(dtype=bf16) leaves them
    inv_freqs = {name: buf.float().clone() for name, buf in hf.named_buffers() if name.endswith("inv_freq")}
    hf = hf.to(dtype).train()
    for name, buf in inv_freqs.items():
        owner, _, leaf = name.rpartition(".")
        hf.get_submodule(owner)._buffers[leaf] = buf
    mm_cfg = from_hf_thinker_config(cfg)
    # random init is skipped (the weights come from transformers); every parameter in bf16 as Float16Module does
    ours = OmniModel(mm_cfg, text_config_overrides={"perform_initialization": False}).to(dev, dtype).train()
    from mm_omni.models.qwen2_5_omni.convert import SPEC

    state = hf_state_to_mm(SPEC, cfg, hf.state_dict())
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("._extra_state") for k in missing), missing
    return cfg, mm_cfg, hf, ours


VARIANTS = {
    "base": "full logits + megatron CE, eager encoders",
    "fused": "chunked fused CE, eager encoders",
    "graphs": "chunked fused CE, CUDA-graphed encoder blocks",
    "mcore-dispatch": "fused, with megatron's own token dispatcher in the MoE layers (not the sync-free local one)",
}


def set_variant(ours, name: str) -> None:
    from mm_omni.models.common.cuda_graphs import enable_encoder_cuda_graphs

    ours.text_decoder.fused_lm_loss = name != "base"
    set_megatron_dispatch(ours, name == "mcore-dispatch")
    if name == "graphs":
        if getattr(ours, "_bench_graphs", None) is None:
            ours._bench_graphs = {m: None for m in ours.modules() if hasattr(m, "graphed_blocks")}
            enable_encoder_cuda_graphs(ours)
            ours._bench_graphs = {m: m.graphed_blocks for m in ours._bench_graphs}
        for m, g in ours._bench_graphs.items():
            m.graphed_blocks = g
    else:
        for m in ours.modules():
            if hasattr(m, "graphed_blocks"):
                m.graphed_blocks = None


def set_megatron_dispatch(ours, on: bool) -> None:
    """megatron's alltoall dispatcher in every MoE layer (on), else the one the model was built with."""
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    built = ours.__dict__.setdefault("_bench_dispatchers", {})
    for m in ours.modules():
        if isinstance(m, MoELayer):
            built.setdefault(m, m.token_dispatcher)
            m.token_dispatcher = (MoEAlltoAllTokenDispatcher(m.num_local_experts, m.local_expert_indices, config=m.config,
                                                             pg_collection=get_default_pg_collection())
                                  if on else built[m])


FAMILIES = ("qwen2_5_omni", "qwen3_omni_moe")


def main() -> None:
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--family", choices=FAMILIES, default="qwen2_5_omni")
    known, rest = first.parse_known_args()
    if known.family == "qwen3_omni_moe":
        import qwen3_omni_step  # bench/qwen3_omni_step.py

        return qwen3_omni_step.main(rest)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=FAMILIES, default="qwen2_5_omni",
                        help="qwen3_omni_moe: bench/qwen3_omni_step.py with the other arguments")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rows", default="ref,heavy,mixed", help="any of ref, heavy, mixed (packed vs padded)")
    parser.add_argument("--variants", default="base,fused,graphs", help=f"ours, any of {list(VARIANTS)}")
    parser.add_argument("--profile", default="", help="write a kernel table of one step per model here")
    parser.add_argument("--smoke", action="store_true", help="tiny widths, fp32 on the CPU: checks the script, not speed")
    args = parser.parse_args()
    if args.smoke:
        os.environ["MM_OMNI_DEVICE"] = "cpu"
        TEXT.update(hidden=64, ffn=128, heads=4, groups=2, mrope=[2, 3, 3])
        VISION.update(hidden=32, ffn=48, heads=2)
        AUDIO.update(hidden=32, ffn=64, heads=4)
        MIXED[:] = [(None, 0, 96), (56, 0, 64), (None, 1, 48), (28, 0.5, 80)]
    elif get_platform().name != "cuda":
        raise SystemExit("bench/omni_step.py needs a CUDA GPU (run it on a GPU machine)")
    import torch.distributed as dist
    import transformers
    from megatron.core import parallel_state, tensor_parallel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29534")
    dist.init_process_group(get_platform().dist_backend, rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    dev, dtype = get_platform().device, (torch.float32 if args.smoke else torch.bfloat16)
    ceiling = matmul_ceiling(dev) if not args.smoke else 1.0
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU smoke run"
    print(f"GPU: {gpu} | torch {torch.__version__} | transformers {transformers.__version__}"
          f" | {dtype} fwd+bwd | 8192^3 bf16 matmul: {ceiling:.0f} TFLOP/s")
    cfg, mm_cfg, hf, ours = build_models(dev, dtype)
    hf_bytes, our_bytes = param_bytes(hf), param_bytes(ours)
    print(f"params: transformers {hf_bytes / 2**30:.2f} GiB, ours {our_bytes / 2**30:.2f} GiB")
    variants = args.variants.split(",")
    for name in variants:
        print(f"  mm_omni[{name}]: {VARIANTS[name]}")

    for kind in args.rows.split(","):
        if kind == "mixed":
            set_variant(ours, variants[-1])
            batch = make_mixed(mm_cfg, dev, dtype)
            res = measure_mixed(hf, ours, batch, args.iters)
            set_variant(ours, "base")
            print(f"\nmixed batch, {len(MIXED)} rows: {batch['desc']}\n  {batch['tokens']} tokens "
                  f"({batch['padded_tokens']} padded); ours = mm_omni[{variants[-1]}]; tokens/s counts real tokens")
            print(f"  {'model':20s} {'ms/step':>8s} {'tokens/s':>9s} {'peak GiB':>9s} {'loss':>9s}")
            for name, r in res.items():
                print(f"  {name:20s} {r['step']:8.1f} {batch['tokens'] / r['step'] * 1e3:9.0f} {r['peak']:9.1f} "
                      f"{r['loss']:9.5f}")
            t, pad, pk = res["transformers padded"], res["mm_omni padded"], res["mm_omni packed"]
            rel = max(abs(r["loss"] - t["loss"]) / abs(t["loss"]) for r in (pad, pk))
            print(f"  packed vs padded (ours): {pad['step'] / pk['step']:.2f}x | packed vs transformers padded: "
                  f"{t['step'] / pk['step']:.2f}x | padded vs transformers padded: {t['step'] / pad['step']:.2f}x"
                  f" | max loss rel diff {rel:.1e} ({'within' if rel < 1e-2 else 'NOT within'} 1e-2)")
            continue
        row = make_row(kind, mm_cfg, dev, dtype)
        flops = row["flops"]
        total = sum(flops.values())
        res = {"transformers": measure(Side("transformers", hf, row, True), our_bytes, args.iters)}
        for name in variants:
            set_variant(ours, name)
            res[f"mm_omni[{name}]"] = measure(Side(name, ours, row, False), hf_bytes, args.iters)
        set_variant(ours, "base")
        print(f"\n{'reference' if kind == 'ref' else 'encoder-heavy'} row: {row['desc']}")
        print(f"  model FLOPs per step: vision {flops['vision'] / 1e12:.2f}, audio {flops['audio'] / 1e12:.2f}, "
              f"decoder {flops['decoder'] / 1e12:.2f} TFLOP (fwd+bwd)")
        print(f"  {'model':16s} {'ms/step':>8s} {'tokens/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak GiB':>9s} "
              f"{'vision ms':>10s} {'audio ms':>9s} {'decoder ms':>11s} {'loss':>9s}")
        t = res["transformers"]
        for name, r in res.items():
            print(f"  {name:16s} {r['step']:8.1f} {row['tokens'] / r['step'] * 1e3:9.0f} {total / r['step'] / 1e9:8.1f} "
                  f"{total / r['step'] / 1e9 / ceiling:6.1%} {r['peak']:9.1f} {r['vision']:10.2f} {r['audio']:9.2f} "
                  f"{r['decoder']:11.2f} {r['loss']:9.5f}")
        for name, o in res.items():
            if name == "transformers":
                continue
            rel = abs(o["loss"] - t["loss"]) / abs(t["loss"])
            print(f"  {name:16s} speedup: step {t['step'] / o['step']:.2f}x | vision {t['vision'] / o['vision']:.2f}x"
                  f" | audio {t['audio'] / o['audio']:.2f}x | decoder {t['decoder'] / o['decoder']:.2f}x"
                  f" | loss rel diff {rel:.1e} ({'within' if rel < 1e-2 else 'NOT within'} 1e-2)")
        o = res[f"mm_omni[{variants[-1]}]"]
        print(f"  module TFLOP/s, transformers vs mm_omni[{variants[-1]}]: "
              + ", ".join(f"{p} {flops[p] / t[p] / 1e9:.0f} vs {flops[p] / o[p] / 1e9:.0f}"
                          for p in ("vision", "audio", "decoder")))
        if args.profile:
            set_variant(ours, variants[-1])
            for name, model, is_hf in (("transformers", hf, True), (f"mm_omni-{variants[-1]}", ours, False)):
                profile_step(Side(name, model, row, is_hf), f"{args.profile}/profile_{kind}_{name}.txt")
            set_variant(ours, "base")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
