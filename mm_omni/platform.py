"""The one place that knows the accelerator: CUDA, Ascend NPU or CPU.

Everything else asks this module for the device, the distributed backend, the RNG seeding,
the autocast dtype and the attention kernel. No other module calls ``torch.cuda`` directly.

CPU mode (tests, CI, the laptop demo)
-------------------------------------
megatron-core 0.16 assumes CUDA in a handful of places that a CPU-only run reaches
(``device=torch.cuda.current_device()`` in DDP buffers, ``torch.zeros(..., device="cuda")`` in the
pipeline schedules, the CUDA RNG tracker, ``DistributedOptimizer``'s ``param.type()`` check).
Rather than patching megatron-core file by file, :func:`install_cpu_adapter` installs one
``TorchFunctionMode`` that sends every CUDA device argument to the CPU, plus CPU stand-ins for the
``torch.cuda`` calls megatron-core makes. It is the same idea as ``torch_npu``'s
``transfer_to_npu``. It is installed only when the CPU is picked (never on a machine with an
accelerator). Set ``MM_OMNI_DEVICE=cpu|cuda|npu`` to force a platform.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import random
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

CUDA, NPU, CPU = "cuda", "npu", "cpu"


@dataclass(frozen=True)
class Platform:
    name: str  # "cuda" | "npu" | "cpu"
    dist_backend: str  # "nccl" | "hccl" | "gloo"
    attention_backend: str  # "sdpa" (cuda) | "npu_fusion" (npu) | "sdpa_math" (cpu)

    @property
    def device(self) -> torch.device:
        if self.name == CPU:
            return torch.device("cpu")
        return torch.device(self.name, current_device_index())


def _npu_available() -> bool:
    try:
        torch_npu = importlib.import_module("torch_npu")
    except ImportError:
        return False
    return bool(getattr(torch_npu, "npu", None) and torch_npu.npu.is_available())


@functools.lru_cache(maxsize=None)
def get_platform() -> Platform:
    """Detect (once) which accelerator this process runs on."""
    forced = os.environ.get("MM_OMNI_DEVICE", "").lower()
    if forced not in ("", CUDA, NPU, CPU):
        raise ValueError(f"MM_OMNI_DEVICE={forced!r}: expected one of cuda, npu, cpu (or unset).")
    name = forced or (CUDA if torch.cuda.is_available() else NPU if _npu_available() else CPU)
    if name == NPU:
        _import_npu_stack()
        platform = Platform(NPU, "hccl", "npu_fusion")
    elif name == CUDA:
        platform = Platform(CUDA, "nccl", "sdpa")
    else:
        install_cpu_adapter()
        platform = Platform(CPU, "gloo", "sdpa_math")
    logger.info("mm_omni platform: %s (backend %s, attention %s)", *platform.__dict__.values())
    return platform


def _import_npu_stack() -> None:
    """Import torch_npu (required) and MindSpeed's megatron adaptor (optional) for Ascend."""
    importlib.import_module("torch_npu")
    found = ["torch_npu"]
    try:
        importlib.import_module("mindspeed.megatron_adaptor")
        found.append("mindspeed.megatron_adaptor")
    except ImportError:
        logger.info("mindspeed not found: running megatron-core without MindSpeed's adaptor")
    logger.info("Ascend stack imported: %s", ", ".join(found))


def current_device_index() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def _accelerator():
    """``torch.cuda`` or ``torch.npu`` (same API for what is used here); None on the CPU."""
    name = get_platform().name
    if name == NPU:
        return torch.npu  # type: ignore[attr-defined]
    return torch.cuda if name == CUDA else None


def set_device() -> torch.device:
    """Bind this process to its local accelerator (no-op on CPU)."""
    accel = _accelerator()
    if accel is not None:
        accel.set_device(current_device_index())
    return get_platform().device


def seed_everything(seed: int) -> None:
    """Seed python, torch (host and accelerator) and megatron-core's model-parallel RNG tracker."""
    random.seed(seed)
    torch.manual_seed(seed)
    accel = _accelerator()
    if accel is not None:
        accel.manual_seed_all(seed)
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def autocast_dtype(bf16: bool = False, fp16: bool = False) -> torch.dtype:
    if bf16 and fp16:
        raise ValueError("--bf16 and --fp16 are mutually exclusive: pick one.")
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32


def synchronize() -> None:
    accel = _accelerator()
    if accel is not None:
        accel.synchronize()


def device_name() -> str:
    """The accelerator's marketing name (``NVIDIA H100 80GB HBM3``), or ``cpu``."""
    accel = _accelerator()
    return accel.get_device_name(current_device_index()) if accel is not None else "cpu"


def release_cached_memory() -> None:
    """Give the caching allocator's unused blocks back to the device (no-op on the CPU)."""
    accel = _accelerator()
    if accel is not None:
        accel.empty_cache()


def max_memory_allocated_gib() -> float:
    accel = _accelerator()
    return accel.max_memory_allocated() / 2**30 if accel is not None else 0.0


def supports_graphs() -> bool:
    """Whether this process can capture CUDA graphs (CUDA only; the NPU's aclgraph is not wired)."""
    return get_platform().name == CUDA


def is_capturing_graph() -> bool:
    return supports_graphs() and torch.cuda.is_current_stream_capturing()


def make_graphed_callables(module: torch.nn.Module, sample_args: tuple, **kwargs):
    """``torch.cuda.make_graphed_callables`` (forward + backward graphs of ``module``).

    Captured in thread-local mode where torch offers it: in training, the DataLoader's pin-memory
    thread allocates pinned host memory while a capture runs, which the default global mode turns
    into a failed capture.
    """
    import inspect

    if not supports_graphs():
        raise RuntimeError(f"CUDA graphs need a CUDA device; this process runs on {get_platform().name}.")
    if "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters:
        kwargs.setdefault("capture_error_mode", "thread_local")
    return torch.cuda.make_graphed_callables(module, sample_args, **kwargs)


# --------------------------------------------------------------------------------------------
# CPU adapter
# --------------------------------------------------------------------------------------------
def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)


_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


class _CudaToCpu(TorchFunctionMode):
    """Redirect CUDA device arguments to the CPU (see the module docstring for why)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):  # pinning needs CUDA (megatron's CP rotary slicing asks for it)
            kwargs["pin_memory"] = False
        if func is torch.Tensor.backward or func is torch.autograd.backward:
            return self._backward(func, args, kwargs)
        name = getattr(func, "__name__", "")
        if name == "cuda":  # tensor.cuda(...) -> the tensor itself
            return args[0]
        if name == "to":
            args = tuple("cpu" if i > 0 and _is_cuda_device(a) else a for i, a in enumerate(args))
        if name == "all_to_all_single":
            # megatron's all-to-all MoE dispatcher moves its split sizes to numpy only from a GPU; on the CPU
            # they stay tensors, which the process group's binding refuses: give it lists
            args = tuple(a.tolist() if i in (2, 3) and isinstance(a, torch.Tensor) else a for i, a in enumerate(args))
            for key in ("output_split_sizes", "input_split_sizes"):
                if isinstance(kwargs.get(key), torch.Tensor):
                    kwargs[key] = kwargs[key].tolist()
        if name == "type" and len(args) == 1 and not kwargs:
            # DistributedOptimizer accepts only 'torch.cuda.*Tensor' parameters.
            out = func(*args)
            return _CUDA_TYPE_NAMES.get(out, out)
        return func(*args, **kwargs)

    def _backward(self, func, args, kwargs):
        """Run the autograd engine with this mode on. A mode is off while its own handler runs, so
        ``loss.backward()`` / ``torch.autograd.backward`` would run megatron's backward functions
        without it (e.g. sequence parallel's ``torch.empty(..., device=torch.cuda.current_device())``).
        The engine is called as megatron's ``custom_backward`` calls it; uncommon forms
        (``inputs=``, non-scalar outputs without a gradient) run as they are."""
        names = (("self", "gradient") if func is torch.Tensor.backward else ("tensors", "grad_tensors")) + (
            "retain_graph", "create_graph")
        p = dict(zip(names, args), **kwargs)
        tensors, grads = p.get("self", p.get("tensors")), p.get("gradient", p.get("grad_tensors"))
        tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
        grads = (grads,) if grads is None or isinstance(grads, torch.Tensor) else tuple(grads)
        grads = grads * len(tensors) if len(grads) == 1 and grads[0] is None else grads
        if (len(args) > len(names) or p.get("inputs") is not None or p.get("grad_variables") is not None
                or len(grads) != len(tensors) or any(g is None and t.numel() != 1 for t, g in zip(tensors, grads))):
            return func(*args, **kwargs)
        grads = tuple(torch.ones_like(t) if g is None else g for t, g in zip(tensors, grads))
        create = bool(p.get("create_graph", False))
        keep = create if p.get("retain_graph") is None else p["retain_graph"]
        with self:
            torch.autograd.Variable._execution_engine.run_backward(
                tensors, grads, keep, create, (), allow_unreachable=True, accumulate_grad=True)


class _NoOpStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return _NoOpEvent()


class _NoOpEvent(_NoOpStream):
    def record(self, *args, **kwargs):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


_cpu_adapter_installed = False


def install_cpu_adapter() -> None:
    """Make megatron-core's CUDA-only code paths run on the CPU (idempotent, process-wide)."""
    global _cpu_adapter_installed
    if _cpu_adapter_installed:
        return
    _cpu_adapter_installed = True
    cuda = torch.cuda
    stand_ins = {
        "current_device": lambda: 0,
        "device_count": lambda: 1,
        "set_device": lambda *a, **k: None,
        "synchronize": lambda *a, **k: None,
        "empty_cache": lambda: None,
        "Stream": _NoOpStream,
        "Event": _NoOpEvent,
        "current_stream": lambda *a, **k: _NoOpStream(),
        "default_stream": lambda *a, **k: _NoOpStream(),
        "stream": lambda *a, **k: contextlib.nullcontext(),
        "get_rng_state": lambda *a, **k: torch.get_rng_state(),
        "set_rng_state": lambda state, *a, **k: torch.set_rng_state(state),
        # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator only.
        "manual_seed": lambda seed: torch.default_generator.manual_seed(seed),
        "manual_seed_all": lambda seed: None,
        "max_memory_allocated": lambda *a, **k: 0,
        "memory_allocated": lambda *a, **k: 0,
    }
    for attr, value in stand_ins.items():
        setattr(cuda, attr, value)
    cuda.random.get_rng_state = stand_ins["get_rng_state"]
    cuda.random.set_rng_state = stand_ins["set_rng_state"]
    import megatron.core.tensor_parallel.random as mcore_random

    mcore_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    _CudaToCpu().__enter__()  # stays active for the life of the process
    logger.info("CPU adapter installed: CUDA device arguments are sent to the CPU")
