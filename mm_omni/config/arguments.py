"""Training arguments: Megatron-style flags, MindSpeed-MM's launcher accepted as it is.

Every flag of MindSpeed-MM's ``finetune_qwen2_5_omni_7b.sh`` parses. Three kinds:

- honoured flags (parallel sizes, batch, optimizer, schedule, precision, checkpoints, logging);
- kernel flags (:data:`KERNEL_FLAGS`) that only pick a MindSpeed kernel: accepted, one log line
  says what we do instead;
- model-structure flags (:data:`STRUCTURE_FLAGS`): model.json wins; a disagreement is logged.

Any other flag is an error naming it. :func:`validate_args` fails before any model is built,
naming the flag, the value and the fix.
"""

from __future__ import annotations

import argparse
import logging
from typing import Optional, Sequence

from jsonargparse import ArgumentParser

from mm_omni.config.errors import ArgumentsError

logger = logging.getLogger(__name__)

# flag -> what we do instead (logged once when the flag is given)
KERNEL_FLAGS = {
    "--use-mcore-models": "models are always megatron-core modules",
    "--use-fused-rmsnorm": "RMSNorm is torch's (megatron WrappedTorchNorm); torch fuses it where it can",
    "--use-fused-swiglu": "SwiGLU runs as megatron-core's MLP activation (silu(gate) * up)",
    "--use-flash-attn": "the attention core picks its kernel per platform (SDPA/flash on CUDA, "
                        "npu_fusion_attention on NPU, SDPA math on CPU)",
    "--no-masked-softmax-fusion": "no masked-softmax kernel is used: attention runs in the attention core",
    "--no-gradient-accumulation-fusion": "gradients accumulate in megatron DDP's main_grad buffers (no fused wgrad)",
    "--use-fused-rotary-pos-emb": "rotary embeddings are applied by megatron-core's unfused rotary on every platform",
    "--no-bias-swiglu-fusion": "no fused bias-SwiGLU kernel is used",
    "--no-rope-fusion": "rope fusion is always off",
    "--use-distributed-optimizer-overlap": "no overlap of the distributed optimizer's gathers",
    "--lora-fusion": "LoRA runs as two small matmuls beside the base linear (no fused LoRA communication kernel)",
}
# --context-parallel-algo values. Every one runs our all-gather context parallelism (keys and values gathered
# over the CP group, queries local; load-balanced 2 x CP chunks): the attention is exact either way, so the
# algorithm changes only the communication. Ulysses' all-to-all over heads would also need heads % CP == 0
# for every stack; it is not implemented, and a run that asks for it is told so in one log line.
CP_ALGOS = {
    "megatron_cp_algo": "all-gather context parallelism",
    "ulysses_cp_algo": "runs as all-gather context parallelism (exact; Ulysses' all-to-all over heads is not "
                       "implemented)",
    "hybrid_cp_algo": "runs as all-gather context parallelism (exact; the Ulysses part is not implemented)",
}
# flag -> text_decoder field of model.json it describes (model.json wins; disagreements are logged)
STRUCTURE_FLAGS = {
    "--num-layers": "num_layers", "--hidden-size": "hidden_size", "--ffn-hidden-size": "ffn_hidden_size",
    "--num-attention-heads": "num_attention_heads", "--num-query-groups": "num_query_groups",
    "--vocab-size": "vocab_size", "--max-position-embeddings": "max_position_embeddings",
    "--normalization": "normalization", "--swiglu": "gated_linear_unit",
    "--group-query-attention": "group_query_attention", "--rotary-base": "rope_theta",
    "--untie-embeddings-and-output-weights": "untie_embeddings_and_output_weights",
    "--disable-bias-linear": "disable_bias_linear", "--add-qkv-bias": "add_qkv_bias",
    "--position-embedding-type": "position_embedding_type", "--init-method-std": "init_method_std",
    "--attention-dropout": "attention_dropout", "--hidden-dropout": "hidden_dropout",
    "--norm-epsilon": "layernorm_epsilon", "--make-vocab-size-divisible-by": None,
}
_BOOL_STRUCTURE = {"--swiglu", "--group-query-attention", "--untie-embeddings-and-output-weights",
                   "--disable-bias-linear", "--add-qkv-bias"}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="mm_omni.train", description="Fine-tune an omni model on megatron-core.",
                       exit_on_error=False)
    add = p.add_argument
    flag = lambda name, **kw: add(name, action="store_true", **kw)  # noqa: E731

    # parallelism
    add("--tensor-model-parallel-size", type=int, default=1)
    add("--pipeline-model-parallel-size", type=int, default=1)
    add("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    add("--virtual-pipeline-model-parallel-size", type=int, default=None)
    add("--context-parallel-size", type=int, default=1)
    add("--expert-model-parallel-size", type=int, default=1,
        help="ranks the text decoder's experts are split over (model.json text_decoder.num_moe_experts)")
    add("--expert-tensor-parallel-size", type=int, default=None,
        help="tensor-parallel size inside each expert (default: --tensor-model-parallel-size, megatron's rule)")
    add("--context-parallel-algo", choices=list(CP_ALGOS), default="megatron_cp_algo",
        help="MindSpeed-MM's context-parallel algorithm names; all run the all-gather CP (see CP_ALGOS)")
    flag("--sequence-parallel")
    flag("--use-distributed-optimizer")
    flag("--hetero-parallel")
    add("--hetero-encoder-mbs-scale", type=int, default=1)
    add("--hetero-encoder-balance", choices=["cost", "count"], default="cost",
        help="how --hetero-parallel splits media over ranks: by cost (patches / mel frames) or by item count")
    add("--distributed-backend", type=str, default=None)
    add("--distributed-timeout-minutes", type=int, default=10)
    flag("--overlap-grad-reduce")
    flag("--overlap-param-gather")
    flag("--variable-seq-lengths")
    # batch and schedule
    add("--micro-batch-size", type=int, default=1)
    add("--global-batch-size", type=int, default=None)
    add("--train-iters", type=int, required=True)
    add("--exit-interval", type=int, default=None)
    add("--seq-length", type=int, default=None)
    add("--num-workers", type=int, default=2)
    # optimizer
    add("--optimizer", type=str, choices=["adam", "sgd"], default="adam")
    add("--lr", type=float, default=None)
    add("--min-lr", type=float, default=0.0)
    add("--lr-decay-style", type=str, choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
        default="linear")
    add("--lr-decay-iters", type=int, default=None)
    add("--lr-warmup-iters", type=int, default=0)
    add("--lr-warmup-fraction", type=float, default=None)
    add("--lr-warmup-init", type=float, default=0.0)
    add("--weight-decay", type=float, default=0.01)
    add("--clip-grad", type=float, default=1.0)
    add("--adam-beta1", type=float, default=0.9)
    add("--adam-beta2", type=float, default=0.999)
    add("--adam-eps", type=float, default=1e-8)
    flag("--enable-dummy-optimizer")
    # precision
    flag("--bf16")
    flag("--fp16")
    add("--loss-scale", type=float, default=None)
    add("--initial-loss-scale", type=float, default=2.0**32)
    flag("--accumulate-allreduce-grads-in-fp32")
    add("--seed", type=int, default=1234)
    # loss
    flag("--calculate-per-token-loss")
    flag("--calculate-per-sample-loss")
    # recompute
    add("--recompute-granularity", type=str, choices=["full", "selective"], default=None)
    add("--recompute-method", type=str, choices=["uniform", "block"], default=None)
    add("--recompute-num-layers", type=int, default=None)
    # checkpoints
    add("--load", type=str, default=None)
    add("--save", type=str, default=None)
    add("--save-interval", type=int, default=None)
    flag("--no-load-optim")
    flag("--no-load-rng")
    flag("--no-save-optim")
    flag("--no-save-rng")
    flag("--finetune")
    add("--ckpt-format", type=str, default="torch")
    # logging and eval
    add("--log-interval", type=int, default=100)
    flag("--log-tps")
    add("--peak-tflops", type=float, default=None,
        help="the device's dense bf16/fp16 peak for --log-tps's MFU (default: known NVIDIA GPUs by name)")
    add("--tensorboard-dir", type=str, default=None)
    flag("--profile", help="profile iterations --profile-step-start..--profile-step-end (end excluded)")
    flag("--use-pytorch-profiler", help="with --profile: torch's profiler (trace + table in the log), not nsys")
    add("--profile-step-start", type=int, default=10)
    add("--profile-step-end", type=int, default=12)
    add("--profile-ranks", type=int, nargs="+", default=[0])
    add("--profile-dir", type=str, default=None, help="where --use-pytorch-profiler writes its trace "
        "(default: --tensorboard-dir, else ./profile)")
    add("--eval-interval", type=int, default=1000)
    add("--eval-iters", type=int, default=100)
    # multimodal inputs
    add("--mm-model", type=str, default=None)
    add("--mm-data", type=str, default=None)
    add("--mm-tool", type=str, default=None)
    add("--tokenizer-type", type=str, default=None)
    add("--tokenizer-model", type=str, default=None)
    # LoRA (MindSpeed-MM / Megatron spellings; --lora-rank as in ms-swift's --lora_rank)
    add("--lora-target-modules", type=str, nargs="*", default=[])
    add("--lora-r", "--lora-rank", dest="lora_r", type=int, default=16)
    add("--lora-alpha", type=float, default=32)
    add("--lora-dropout", type=float, default=0.0)
    # LoRA checkpoints: saves hold only the trainable parameters; --lora-load DIR resumes them over --load's base
    add("--lora-load", type=str, default=None)
    flag("--lora-ckpt-filter")  # MindSpeed's "save only the LoRA weights": what every LoRA save does here
    # speed: CUDA graphs of the encoders' blocks (mm_omni.models.common.cuda_graphs; bench/omni_step.py)
    flag("--encoder-cuda-graphs")
    # kernel flags and model-structure flags: accepted, see the module docstring
    for name in KERNEL_FLAGS:
        flag(name)
    for name in STRUCTURE_FLAGS:
        if name in _BOOL_STRUCTURE:
            flag(name)
        else:
            add(name, type=str, default=None)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv``; an unknown flag raises :class:`ArgumentsError` naming it."""
    try:
        ns = build_parser().parse_args(list(argv) if argv is not None else None)
    except (argparse.ArgumentError, SystemExit) as err:
        raise ArgumentsError(f"mm_omni.train: {err}") from None
    args = argparse.Namespace(**vars(ns))
    args.given = _given_flags(argv)
    return args


def _given_flags(argv: Optional[Sequence[str]]) -> set[str]:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def _fail(flag: str, value, fix: str) -> None:
    raise ArgumentsError(f"{flag}={value}: {fix}")


def validate_args(args: argparse.Namespace, world_size: int, model_cfg=None) -> argparse.Namespace:
    """Check the combination and derive ``data_parallel_size``, ``num_microbatches``, ``vpp_size``.

    Runs before any model is built; every error names the flag, its value and the fix. With
    ``--hetero-parallel`` the parallel sizes come from ``model_cfg`` (model.json, see
    :mod:`mm_omni.config.hetero_layout`).
    """
    if args.hetero_parallel:
        from mm_omni.config.hetero_layout import resolve_layout

        resolve_layout(args, model_cfg, world_size)
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    for name, v in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
                    ("--context-parallel-size", cp), ("--micro-batch-size", args.micro_batch_size),
                    ("--train-iters", args.train_iters)):
        if v < 1:
            _fail(name, v, "must be >= 1")
    if world_size % (tp * pp * cp):
        _fail("--tensor-model-parallel-size x --pipeline-model-parallel-size x --context-parallel-size",
              f"{tp}x{pp}x{cp}", f"the world size {world_size} must be divisible by TPxPPxCP={tp * pp * cp}; "
              "change the parallel sizes or the number of processes")
    dp = world_size // (tp * pp * cp)
    args.data_parallel_size = dp
    mbs = args.micro_batch_size
    if args.global_batch_size is None:
        args.global_batch_size = mbs * dp
    if args.global_batch_size % (mbs * dp):
        _fail("--global-batch-size", args.global_batch_size,
              f"must be divisible by micro-batch-size x data-parallel size = {mbs}x{dp} = {mbs * dp}")
    args.num_microbatches = args.global_batch_size // (mbs * dp)
    if args.bf16 and args.fp16:
        _fail("--bf16 --fp16", "both", "pick one precision")
    if args.calculate_per_token_loss and args.calculate_per_sample_loss:
        _fail("--calculate-per-token-loss --calculate-per-sample-loss", "both", "pick one loss mode")
    if args.sequence_parallel and tp == 1:
        logger.info("--sequence-parallel with tensor-model-parallel-size 1: nothing to split, turned off")
        args.sequence_parallel = False
    _validate_vpp(args, pp)
    _validate_experts(args, world_size, model_cfg)
    if args.lr is None:
        _fail("--lr", None, "give a learning rate, e.g. --lr 1e-5")
    if args.min_lr > args.lr:
        _fail("--min-lr", args.min_lr, f"must not exceed --lr {args.lr}")
    if args.lr_warmup_fraction is not None and "--lr-warmup-iters" in args.given and args.lr_warmup_iters:
        _fail("--lr-warmup-fraction", args.lr_warmup_fraction, "give either it or --lr-warmup-iters, not both")
    if args.ckpt_format != "torch":
        _fail("--ckpt-format", args.ckpt_format, "only 'torch' (Megatron's mp_rank_XX/model_optim_rng.pt) is supported")
    if args.save_interval is not None and args.save_interval < 1:
        _fail("--save-interval", args.save_interval, "must be >= 1")
    if args.profile and not 1 <= args.profile_step_start < args.profile_step_end:
        _fail("--profile-step-start --profile-step-end", f"{args.profile_step_start} {args.profile_step_end}",
              "need 1 <= start < end (iterations start..end-1 are profiled)")
    if args.recompute_method and not args.recompute_granularity:
        _fail("--recompute-method", args.recompute_method, "also give --recompute-granularity full")
    if args.recompute_granularity == "full" and args.recompute_method and args.recompute_num_layers is None:
        _fail("--recompute-num-layers", None, "give the number of layers per recompute group with --recompute-method")
    if args.hetero_parallel:
        from mm_omni.config.hetero_layout import check_batch

        check_batch(args, model_cfg, world_size)
    _validate_lora(args)
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        _fail("--peak-tflops", args.peak_tflops, "give the device's dense bf16/fp16 peak in TFLOP/s, e.g. 989 for an "
              "H100 SXM, or drop the flag")
    if args.encoder_cuda_graphs:
        from mm_omni import platform

        if not platform.supports_graphs():
            _fail("--encoder-cuda-graphs", True, f"CUDA graphs need a CUDA GPU and this run is on "
                  f"{platform.get_platform().name}; drop the flag")
    return args


def _validate_experts(args: argparse.Namespace, world_size: int, model_cfg) -> None:
    """Expert parallelism: megatron's expert grid (ETP x EP x PP) over the same ranks as the dense one, so
    EP x ETP must divide the ranks of a pipeline stage; EP must divide the model's experts."""
    ep, etp = args.expert_model_parallel_size, args.expert_tensor_parallel_size
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if ep < 1:
        _fail("--expert-model-parallel-size", ep, "must be >= 1")
    if etp is not None and etp < 1:
        _fail("--expert-tensor-parallel-size", etp, "must be >= 1 (or leave it out: it defaults to "
              "--tensor-model-parallel-size)")
    if etp is not None and etp != tp:
        _fail("--expert-tensor-parallel-size", etp, f"only the tensor-parallel size ({tp}) is supported: checkpoints "
              "name each rank directory by its TP and EP rank, which does not identify experts split otherwise; "
              "drop the flag")
    etp = tp
    stage = world_size // pp  # DP x CP x TP ranks per pipeline stage
    if stage % (ep * etp):
        _fail("--expert-model-parallel-size", ep,
              f"EP x expert-tensor-parallel size = {ep}x{etp} must divide the {stage} ranks of a pipeline stage "
              f"(data-parallel {args.data_parallel_size} x context-parallel {args.context_parallel_size} x "
              f"tensor-parallel {tp}); change it or the number of processes")
    text = getattr(model_cfg, "text_decoder", None)
    experts = getattr(text, "num_moe_experts", None)
    if text is not None and experts is None and ep > 1:
        _fail("--expert-model-parallel-size", ep, "the model has no experts (model.json text_decoder.num_moe_experts "
              "is unset): drop the flag, or train a mixture-of-experts model")
    if experts is not None and experts % ep:
        _fail("--expert-model-parallel-size", ep, f"must divide text_decoder.num_moe_experts={experts} (each EP rank "
              f"holds num_moe_experts / EP experts): use one of {[d for d in range(1, experts + 1) if experts % d == 0]}")
    dispatcher = getattr(text, "moe_token_dispatcher_type", None)
    if experts is not None and ep > args.context_parallel_size and dispatcher == "allgather":
        _fail("--expert-model-parallel-size", ep, "text_decoder.moe_token_dispatcher_type='allgather' gathers equal "
              "token counts from every EP rank, and here EP spans data-parallel ranks whose micro-batches differ in "
              "length: set moe_token_dispatcher_type to 'alltoall' in model.json (the same math)")
    if experts is not None and tp > 1 and not args.sequence_parallel:
        _fail("--sequence-parallel", False, f"text_decoder.num_moe_experts={experts} at --tensor-model-parallel-size "
              f"{tp}: megatron's token dispatcher needs sequence parallelism; add --sequence-parallel")
    if ep > 1 and args.hetero_parallel:
        _fail("--expert-model-parallel-size", ep, "with --hetero-parallel is not supported: use EP 1 there")


def _validate_lora(args: argparse.Namespace) -> None:
    if not args.lora_target_modules:
        for name, value in (("--lora-load", args.lora_load), ("--lora-ckpt-filter", args.lora_ckpt_filter)):
            if value:
                _fail(name, value, "is a LoRA option and LoRA is off: give --lora-target-modules (and --lora-r / "
                      "--lora-alpha) as the run that trained the adapters")
        if args.given & {"--lora-r", "--lora-rank", "--lora-alpha", "--lora-dropout"}:
            logger.warning("--lora-r/--lora-alpha/--lora-dropout given without --lora-target-modules: no LoRA")
        return
    if args.lora_load and not args.load:
        _fail("--lora-load", args.lora_load, "the base weights come from --load: give --load BASE (the checkpoint "
              "the adapters were trained on)")
    if args.lora_ckpt_filter:
        logger.info("--lora-ckpt-filter accepted: with LoRA every save holds only the trainable parameters")
    from mm_omni.lora.targets import LoraTargetError, parse_targets

    try:
        parse_targets(args.lora_target_modules)
    except LoraTargetError as err:
        raise ArgumentsError(str(err)) from None
    if args.lora_r < 1:
        _fail("--lora-r", args.lora_r, "the LoRA rank must be >= 1, e.g. 8 or 16")
    if args.lora_alpha <= 0:
        _fail("--lora-alpha", args.lora_alpha, "must be > 0 (the update is scaled by alpha / r)")
    if not 0.0 <= args.lora_dropout < 1.0:
        _fail("--lora-dropout", args.lora_dropout, "must be in [0, 1)")


def _validate_vpp(args: argparse.Namespace, pp: int) -> None:
    vpp = args.virtual_pipeline_model_parallel_size
    if args.num_layers_per_virtual_pipeline_stage is not None:
        if pp == 1:
            _fail("--num-layers-per-virtual-pipeline-stage", args.num_layers_per_virtual_pipeline_stage,
                  "interleaved pipelining needs --pipeline-model-parallel-size > 1")
        if vpp is None and args.num_layers is not None:
            layers = int(args.num_layers)
            per = args.num_layers_per_virtual_pipeline_stage
            if layers % (pp * per):
                _fail("--num-layers-per-virtual-pipeline-stage", per,
                      f"num layers {layers} must be divisible by PP x this = {pp * per}")
            vpp = layers // (pp * per)
    if vpp is not None and vpp > 1:
        if pp == 1:
            _fail("--virtual-pipeline-model-parallel-size", vpp, "needs --pipeline-model-parallel-size > 1")
        if args.num_microbatches % pp:
            _fail("--global-batch-size", args.global_batch_size,
                  f"interleaved pipelining needs the number of micro-batches ({args.num_microbatches}) "
                  f"to be a multiple of --pipeline-model-parallel-size {pp}")
    args.vpp_size = vpp if vpp and vpp > 1 else None


def log_accepted_flags(args: argparse.Namespace, model_cfg=None) -> None:
    """One line per kernel flag given; one per structure flag that disagrees with model.json."""
    for name, instead in KERNEL_FLAGS.items():
        if name in args.given:
            logger.info("%s accepted (selects a MindSpeed kernel): %s", name, instead)
    if "--context-parallel-algo" in args.given and args.context_parallel_algo != "megatron_cp_algo":
        logger.info("--context-parallel-algo %s accepted: %s", args.context_parallel_algo,
                    CP_ALGOS[args.context_parallel_algo])
    text = getattr(model_cfg, "text_decoder", None)
    for name, field in STRUCTURE_FLAGS.items():
        if name not in args.given:
            continue
        if text is None or field is None:
            logger.info("%s accepted: the model's structure comes from model.json (--mm-model)", name)
            continue
        given = getattr(args, name[2:].replace("-", "_"))
        ours = getattr(text, field, None)
        if str(given).lower() != str(ours).lower():
            logger.warning("%s=%s disagrees with model.json text_decoder.%s=%s: model.json wins",
                           name, given, field, ours)
