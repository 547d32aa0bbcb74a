"""A PEFT LoRA adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors``, what
``peft.PeftModel.from_pretrained(model, dir)`` reads (the format LLaMA-Factory and ms-swift write).

The config sets every field that changes what the adapter computes to what these weights need (plain
LoRA: ``scaling = lora_alpha / r``; no DoRA, rsLoRA, bias or fan_in_fan_out) and leaves the rest to
peft's defaults, so older and newer peft versions read it alike. ``target_modules`` lists the adapted
modules by their full names (peft matches a name or its ``.name`` suffix), so exactly those get an
adapter, however many other modules share their last name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from safetensors.torch import save_file
from torch import Tensor

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # what a PeftModel puts before the wrapped model's module names


def write_peft_adapter(dst: Path, adapters: Mapping[str, tuple[Tensor, Tensor]], r: int, alpha: float,
                       dropout: float, base_model: str,
                       parameters: Mapping[str, tuple[Tensor, Tensor]] | None = None) -> None:
    """``adapters``: module name (as the model's ``named_modules``) -> ``(A [r, in], B [out, r])``;
    ``parameters``: name of a 3D parameter ``[E, out, in]`` (fused experts, peft's ``target_parameters``) ->
    ``(A [E r, in], B [out, r E])``, in the order of the parameters in their module."""
    tensors = {}
    for module, (a, b) in adapters.items():
        if a.shape[0] != r or b.shape[1] != r:
            raise ValueError(f"{module}: LoRA A {tuple(a.shape)} / B {tuple(b.shape)} are not of rank {r}")
        # own copies: one A may serve several modules (fused QKV), and safetensors refuses shared storage
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.detach().contiguous().clone()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b.detach().contiguous().clone()
    parameters = dict(parameters or {})
    per_module: dict[str, list[str]] = {}
    for name in parameters:
        per_module.setdefault(name.rpartition(".")[0], []).append(name)
    for module, names in per_module.items():
        # peft wraps the module once per targeted parameter, in the config's order: the first wrapper is the
        # innermost, reached through the later ones' ``base_layer``
        for i, name in enumerate(names):
            a, b = parameters[name]
            if a.shape[0] % r or b.shape[1] != a.shape[0]:
                raise ValueError(f"{name}: LoRA A {tuple(a.shape)} / B {tuple(b.shape)} are not rank {r} per expert")
            stem = f"{PREFIX}{module}{'.base_layer' * (len(names) - 1 - i)}"
            tensors[f"{stem}.lora_A.weight"] = a.detach().contiguous().clone()
            tensors[f"{stem}.lora_B.weight"] = b.detach().contiguous().clone()
    save_file(tensors, Path(dst) / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha, "lora_dropout": dropout,
        "target_modules": sorted(adapters) or None, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
    }
    if parameters:  # only then: a peft without target_parameters still reads module-only adapters
        config["target_parameters"] = list(parameters)
    (Path(dst) / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
