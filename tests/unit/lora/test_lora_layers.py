"""LoRA adapters on megatron's parallel linears (1 process, TP=1): base at init, merge == forward, targets."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import init_megatron


@pytest.fixture(scope="module")
def megatron():
    init_megatron(seed=0)


def _config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True,
                             gradient_accumulation_fusion=False, params_dtype=torch.float32)


def _linears():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    init = torch.nn.init.normal_
    return {
        "column": ColumnParallelLinear(16, 24, config=_config(), init_method=init, bias=True, gather_output=False),
        "row": RowParallelLinear(24, 16, config=_config(), init_method=init, bias=True, input_is_parallel=True,
                                 skip_bias_add=False),
        "linear": torch.nn.Linear(16, 8),
    }


def _out(layer, x):
    y = layer(x)
    return y[0] if isinstance(y, tuple) else y


@pytest.mark.parametrize("kind", ["column", "row", "linear"])
def test_init_equals_base_and_merge_equals_forward(megatron, kind):
    from mm_omni.lora.layers import add_lora
    from mm_omni.lora.merge import merge_state_dict, merged_weight

    layer = _linears()[kind]
    x = torch.randn(5, 2, layer.weight.shape[1])
    base = _out(layer, x).detach()
    add_lora(layer, r=4, alpha=8, dropout=0.1, generator=torch.Generator().manual_seed(0))
    layer.eval()  # dropout off: the adapter is a plain function of x
    assert torch.equal(_out(layer, x), base)  # B = 0: exactly the base model
    assert layer.lora_A.weight.abs().sum() > 0 and layer.lora_scale == 2.0
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    adapted = _out(layer, x).detach()
    assert (adapted - base).abs().max() > 1e-3
    sd = layer.state_dict()
    assert {"weight", "lora_A.weight", "lora_B.weight"} <= set(sd)  # the base weight keeps its name
    merged = merge_state_dict(sd, layer.lora_scale)
    assert not any("lora" in k for k in merged)
    plain = _linears()[kind]
    plain.load_state_dict(merged, strict=False)
    torch.testing.assert_close(_out(plain, x), adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged["weight"], merged_weight(sd["weight"], sd["lora_A.weight"],
                                                               sd["lora_B.weight"], 2.0))


def test_dropout_acts_on_lora_input_only(megatron):
    from mm_omni.lora.layers import add_lora

    layer = _linears()["column"]
    x = torch.randn(5, 2, 16)
    base = _out(layer, x).detach()
    add_lora(layer, r=4, alpha=4, dropout=0.5, generator=torch.Generator().manual_seed(0))
    layer.train()
    assert torch.equal(_out(layer, x), base)  # B = 0: dropout changes nothing of the base path
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    assert not torch.equal(_out(layer, x), _out(layer, x))  # training: random masks on the LoRA input


def test_live_merge_keeps_outputs(megatron):
    from mm_omni.lora.layers import add_lora
    from mm_omni.lora.merge import merge_lora_

    layer = _linears()["row"]
    add_lora(layer, r=2, alpha=2, dropout=0.0, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 1, 24)
    before = _out(layer, x).detach()
    assert merge_lora_(layer) == 1
    torch.testing.assert_close(_out(layer, x), before, rtol=1e-5, atol=1e-5)
    assert layer.lora_B.weight.abs().sum() == 0


def test_targets():
    from mm_omni.lora.targets import LoraTargetError, parse_targets

    name = "text_decoder.decoder.layers.3.self_attention.linear_qkv"
    def hit(spec, n=name):
        return any(t.matches(n) for t in parse_targets([spec]))
    assert hit("linear_qkv") and hit("text_decoder.linear_qkv") and hit("self_attention.linear_qkv")
    assert hit("text_decoder.decoder.layers.3.self_attention.linear_qkv") and hit("all-linear")
    assert hit("text_decoder.") and hit("linear_proj,linear_qkv")
    assert not hit("image_encoder.linear_qkv") and not hit("linear_proj") and not hit("layers.2.linear_qkv")
    assert not hit("decoder.linear_qkv", "text_decoder.x.linear_qkv")  # whole path components only
    assert not hit("all-linear", "text_decoder.output_layer") and hit("output_layer", "text_decoder.output_layer")
    with pytest.raises(LoraTargetError, match="not a module name"):
        parse_targets(["linear qkv"])


def test_lora_flags():
    from mm_omni.config.arguments import ArgumentsError, parse_args, validate_args

    base = ["--train-iters", "1", "--lr", "1e-4"]
    args = validate_args(parse_args(base + ["--lora-target-modules", "linear_qkv", "text_decoder.linear_fc1,linear_fc2",
                                            "--lora-rank", "8", "--lora-alpha", "16", "--lora-fusion"]), 1)
    assert (args.lora_r, args.lora_alpha, args.lora_dropout) == (8, 16.0, 0.0)
    for bad, match in ((["--lora-r", "0"], "--lora-r=0"), (["--lora-dropout", "1.0"], "--lora-dropout=1.0"),
                       (["--lora-alpha", "-1"], "--lora-alpha=-1")):
        with pytest.raises(ArgumentsError, match=match):
            validate_args(parse_args(base + ["--lora-target-modules", "linear_qkv"] + bad), 1)
