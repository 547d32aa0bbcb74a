"""``--lora-target-modules``: which linears get an adapter; adding them; freezing everything else.

A target names megatron submodules by their last name, optionally behind a module path that must
appear in the full name at a component boundary (MindSpeed-MM / ms-swift spellings)::

    linear_qkv linear_proj linear_fc1 linear_fc2       # every layer of every stack
    text_decoder.linear_qkv                            # only the decoder's
    image_encoder.linear_fc1 audio_encoder.encoder.proj
    text_decoder.decoder.layers.0.self_attention.linear_qkv   # one layer (global layer numbers)
    all-linear  (or all)                               # every linear but the output layer
    image_encoder.  (a path and a dot)                 # every linear under image_encoder
    mlp.experts.                                       # every expert of a MoE decoder (one adapter each)

Values may also be comma-separated. Names use global layer numbers (pipeline stages renumber their
layers from 0; the adapter's seed and the match use the global number) and global expert numbers
(``local_experts.<i>`` of EP rank r is expert ``r * local + i``), so every TP / PP / DP / EP layout
adapts the same layers with the same initial ``A``. A target that matches nothing on any rank, or a
module that is not a linear, fails naming it. Modules that model.json freezes get no adapter (their
weights are frozen already; a LoRA there would train them anyway): logged.
"""

from __future__ import annotations

import logging
import re
import zlib
from typing import Iterable, Sequence

import torch

from mm_omni.lora.layers import LoraMixin, add_lora
from mm_omni.lora.targets import LoraTargetError, Target, parse_targets

logger = logging.getLogger(__name__)

_LAYER_INDEX = re.compile(r"(^|\.)layers\.(\d+)(?=\.|$)")
_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)(?=\.|$)")


def global_name(model: torch.nn.Module, name: str) -> str:
    """``name`` with each ``layers.<i>`` of a megatron ``TransformerLayer`` replaced by its global index, and
    each ``local_experts.<i>`` of an expert-parallel rank by its global expert number."""
    def layer(m: re.Match) -> str:
        module = model.get_submodule(name[:m.end()])
        number = getattr(module, "layer_number", None)
        index = number - 1 if isinstance(number, int) else int(m.group(2))
        return f"{m.group(1)}layers.{index}"

    def expert(m: re.Match) -> str:
        experts = model.get_submodule(name[:m.start()])  # megatron's SequentialMLP: this rank's experts
        group = getattr(experts, "ep_group", None)
        rank = group.rank() if group is not None and group.size() > 1 else 0
        return f".local_experts.{rank * experts.num_local_experts + int(m.group(1))}"

    # experts first: they come after the layer index, so the layer matches keep their places in ``name``
    return _LAYER_INDEX.sub(layer, _LOCAL_EXPERT.sub(expert, name))


def _is_linear(module: torch.nn.Module) -> bool:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return isinstance(module, (ColumnParallelLinear, RowParallelLinear, torch.nn.Linear))


def apply_lora(model: torch.nn.Module, targets: Sequence[Target], r: int, alpha: float, dropout: float,
               seed: int) -> dict:
    """Add adapters to ``model``'s matching linears (in place); return what matched, for the checks.

    ``{"adapted": [global names], "frozen": [...], "not_linear": [...], "per_target": {text: count}}``.
    """
    found = {"adapted": [], "frozen": [], "not_linear": [], "per_target": {t.text: 0 for t in targets}}
    for name, module in list(model.named_modules()):
        if not name or isinstance(module, LoraMixin):
            continue
        gname = global_name(model, name)
        hits = [t for t in targets if t.matches(gname)]
        if not hits:
            continue
        if not _is_linear(module) or getattr(module, "weight", None) is None:
            if any(t.leaf for t in hits):  # "all-linear" skips what is not a linear
                what = type(module).__name__ if not _is_linear(module) else "no weight of its own: tied embeddings"
                found["not_linear"].append(f"{gname} ({what})")
            continue
        for t in hits:
            found["per_target"][t.text] += 1
        if not module.weight.requires_grad:
            found["frozen"].append(gname)
            continue
        gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{gname}".encode()))
        add_lora(module, r, alpha, dropout, gen)
        found["adapted"].append(gname)
    return found


def freeze_base(modules: Iterable[torch.nn.Module]) -> None:
    """Only LoRA parameters train."""
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(getattr(p, "is_lora", False))


def lora_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if getattr(p, "is_lora", False)}


def check_found(found: Iterable[dict], targets: Sequence[Target]) -> None:
    """Over every rank's result (``found`` gathered from all ranks): fail on a useless target."""
    found = list(found)
    not_linear = sorted({n for f in found for n in f["not_linear"]})
    if not_linear:
        raise LoraTargetError(f"--lora-target-modules: {not_linear[:4]} are not linear layers; LoRA adapts "
                              "ColumnParallelLinear / RowParallelLinear / torch.nn.Linear modules")
    for t in targets:
        if not sum(f["per_target"].get(t.text, 0) for f in found):
            raise LoraTargetError(f"--lora-target-modules {t.text!r} matches no linear layer of the model; "
                                  "megatron names are e.g. linear_qkv, linear_proj, linear_fc1, linear_fc2, "
                                  "optionally behind a path such as text_decoder. or image_encoder.")
    if not sum(len(f["adapted"]) for f in found):
        frozen = sorted({n for f in found for n in f["frozen"]})
        raise LoraTargetError(f"--lora-target-modules matched only modules that model.json freezes ({frozen[:4]}"
                              "...): unfreeze them there or target other modules")


def add_lora_from_args(chunks: Sequence[torch.nn.Module], args) -> None:
    """``--lora-*`` flags on this rank's model chunks: adapters added, everything else frozen, checked
    over all ranks (a pipeline stage may hold none of a target's modules; the whole model must)."""
    targets = parse_targets(args.lora_target_modules)
    found = [apply_lora(c, targets, args.lora_r, args.lora_alpha, args.lora_dropout, args.seed) for c in chunks]
    mine = {"adapted": [n for f in found for n in f["adapted"]], "frozen": [n for f in found for n in f["frozen"]],
            "not_linear": [n for f in found for n in f["not_linear"]],
            "per_target": {t.text: sum(f["per_target"][t.text] for f in found) for t in targets}}
    everyone = [mine]
    if torch.distributed.is_initialized():
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, mine)
    check_found(everyone, targets)
    freeze_base(chunks)
    if mine["frozen"]:
        logger.info("LoRA: %d targeted modules are frozen by model.json and get no adapter (e.g. %s)",
                    len(mine["frozen"]), mine["frozen"][0])
    trainable = sum(p.numel() for c in chunks for p in lora_parameters(c).values())
    total = sum(p.numel() for c in chunks for p in c.parameters())
    logger.info("LoRA r=%d alpha=%s dropout=%s on %d modules of this rank (e.g. %s): %d trainable of %d parameters",
                args.lora_r, args.lora_alpha, args.lora_dropout, len(mine["adapted"]),
                mine["adapted"][0] if mine["adapted"] else "-", trainable, total)
