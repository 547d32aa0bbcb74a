"""platform.py: detection, the CPU adapter, and the Ascend dispatch (with a stand-in torch_npu)."""

import sys
import types

import pytest
import torch

from mm_omni import platform as plat


@pytest.fixture
def fresh_platform(monkeypatch):
    plat.get_platform.cache_clear()
    yield monkeypatch
    plat.get_platform.cache_clear()


def test_cpu_platform_and_adapter(fresh_platform):
    fresh_platform.setenv("MM_OMNI_DEVICE", "cpu")
    p = plat.get_platform()
    assert (p.name, p.dist_backend, p.attention_backend) == ("cpu", "gloo", "sdpa_math")
    assert p.device == torch.device("cpu")
    # megatron-core style CUDA calls land on the CPU
    t = torch.zeros(3, device=torch.cuda.current_device())
    assert t.device.type == "cpu" and t.cuda() is t and t.to("cuda").device.type == "cpu"
    assert torch.ones(2).type() == "torch.cuda.FloatTensor"
    state = torch.cuda.get_rng_state()
    a = torch.rand(2)
    torch.cuda.set_rng_state(state)
    assert torch.equal(a, torch.rand(2))


def test_bad_forced_device(fresh_platform):
    fresh_platform.setenv("MM_OMNI_DEVICE", "tpu")
    with pytest.raises(ValueError, match="MM_OMNI_DEVICE='tpu'"):
        plat.get_platform()


def test_npu_dispatch_with_stand_in(fresh_platform):
    """Untested on real Ascend hardware: this checks only that the NPU branch is taken."""
    imported = []
    fake_npu = types.ModuleType("torch_npu")
    fake_npu.npu = types.SimpleNamespace(is_available=lambda: True)
    fake_mindspeed = types.ModuleType("mindspeed")
    fake_adaptor = types.ModuleType("mindspeed.megatron_adaptor")
    fresh_platform.setitem(sys.modules, "torch_npu", fake_npu)
    fresh_platform.setitem(sys.modules, "mindspeed", fake_mindspeed)
    fresh_platform.setitem(sys.modules, "mindspeed.megatron_adaptor", fake_adaptor)
    orig_import = plat.importlib.import_module
    fresh_platform.setattr(plat.importlib, "import_module", lambda n: imported.append(n) or orig_import(n))
    fresh_platform.setenv("MM_OMNI_DEVICE", "npu")
    p = plat.get_platform()
    assert (p.name, p.dist_backend, p.attention_backend) == ("npu", "hccl", "npu_fusion")
    assert imported[:2] == ["torch_npu", "mindspeed.megatron_adaptor"]


def test_autocast_dtype():
    assert plat.autocast_dtype(bf16=True) is torch.bfloat16
    assert plat.autocast_dtype(fp16=True) is torch.float16
    assert plat.autocast_dtype() is torch.float32
    with pytest.raises(ValueError, match="mutually exclusive"):
        plat.autocast_dtype(bf16=True, fp16=True)
