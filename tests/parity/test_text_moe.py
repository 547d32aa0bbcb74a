"""The text decoder in its Qwen3-MoE form vs transformers' ``Qwen3OmniMoeThinkerTextModel`` + ``lm_head``.

fp32 on CPU, weights copied through the stack's key table (:func:`mm_omni.models.text.hf_mapping.moe_table`,
checkpoint spelling with one tensor per expert): logits, LM loss, the load-balancing loss and every
parameter gradient. The model has an explicit head size (``head_dim`` x heads != hidden size), per-head
q/k RMSNorm, GQA, 8 experts top-2, interleaved M-RoPE with fractional 3D positions. The gradients are those
of ``lm_loss + router_aux_loss_coef * mean over MoE layers of transformers' per-layer load-balancing loss``
(mm_omni.models.text.moe); with one MoE layer that is transformers' own pooled loss, checked as well.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import init_megatron, randomize_, rel_err

TOL = 1e-5
E, K = 8, 2
AUX = 0.05  # router_aux_loss_coef: large enough that its gradient is well above TOL


def hf_text_config(**overrides):
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTextConfig

    kwargs = dict(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6, max_position_embeddings=4096,
        # 6 + 5 + 5 = head_dim / 2; the last frequency (15 >= 3 * 5) is temporal, as in the real [24, 20, 20]
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [6, 5, 5],
                         "interleaved": True, "mrope_interleaved": True},
        moe_intermediate_size=32, num_experts=E, num_experts_per_tok=K, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=AUX, attention_bias=False,
    )
    kwargs.update(overrides)
    cfg = Qwen3OmniMoeTextConfig(**kwargs)
    cfg._attn_implementation = "sdpa"
    return cfg


def moe_pattern(text) -> list[int]:
    return [int(i not in text.mlp_only_layers and (i + 1) % text.decoder_sparse_step == 0)
            for i in range(text.num_hidden_layers)]


def mm_text_config(text):
    """The decoder config a family adapter would build from ``text`` (written out here: the family comes later)."""
    from mm_omni.config.model import TextDecoderConfig
    from mm_omni.models.text.moe import aux_loss_coeff_from_hf

    pattern = moe_pattern(text)
    return TextDecoderConfig(
        num_layers=text.num_hidden_layers, hidden_size=text.hidden_size, ffn_hidden_size=text.intermediate_size,
        num_attention_heads=text.num_attention_heads, num_query_groups=text.num_key_value_heads,
        kv_channels=text.head_dim, vocab_size=text.vocab_size, layernorm_epsilon=text.rms_norm_eps,
        rope_theta=text.rope_parameters["rope_theta"], mrope_section=text.rope_parameters["mrope_section"],
        mrope_interleaved=True, qk_layernorm=True, add_qkv_bias=False, gated_linear_unit=True,
        activation_func="silu", max_position_embeddings=text.max_position_embeddings,
        num_moe_experts=text.num_experts, moe_router_topk=text.num_experts_per_tok,
        moe_ffn_hidden_size=text.moe_intermediate_size, moe_layer_freq=pattern,
        moe_router_pre_softmax=not text.norm_topk_prob,
        moe_aux_loss_coeff=aux_loss_coeff_from_hf(text.router_aux_loss_coef, text.num_experts_per_tok, sum(pattern)),
    )


def build_hf(text, seed: int = 0):
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextModel

    torch.manual_seed(seed)
    model = Qwen3OmniMoeThinkerTextModel._from_config(text).float()
    lm_head = torch.nn.Linear(text.hidden_size, text.vocab_size, bias=False)
    torch.nn.init.normal_(lm_head.weight, std=0.02)
    randomize_(model, seed + 1)  # router, q/k norms and every norm weight get distinct values
    return model, lm_head


def checkpoint_spelling(state: dict, text) -> dict:
    """transformers' in-memory names -> the checkpoint's: ``model.`` prefix, one tensor per expert
    (``gate_up_proj`` [E, 2I, h] is ``[gate; up]`` per expert, ``down_proj`` [E, h, I])."""
    out = {}
    for k, v in state.items():
        if k == "lm_head.weight":
            out[k] = v
        elif k.endswith("mlp.experts.gate_up_proj"):
            base = "model." + k[: -len("gate_up_proj")]
            for e in range(v.shape[0]):
                gate, up = v[e].chunk(2, dim=0)
                out[f"{base}{e}.gate_proj.weight"], out[f"{base}{e}.up_proj.weight"] = gate, up
        elif k.endswith("mlp.experts.down_proj"):
            base = "model." + k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = v[e]
        else:
            out["model." + k] = v
    return out


def rules(text):
    """The MoE stack table; dense layers (``mlp_only_layers``) take the Qwen2 table's MLP entries."""
    from mm_omni.checkpoint.mapping import expand
    from mm_omni.models.text import hf_mapping

    counts = {"text": {"layer": text.num_hidden_layers, "expert": text.num_experts}}
    attention = {"text": hf_mapping.attention(text)}
    out = expand(hf_mapping.moe_table(tied=False), counts, attention)
    if not all(moe_pattern(text)):
        dense = [m for m in hf_mapping.table(tied=False) if ".mlp.linear_fc" in m.mm]
        out += expand(dense, counts, attention)
    return out


def hf_to_mm(hf_state: dict, text) -> dict:
    from mm_omni.checkpoint.mapping import hf_to_mm as convert

    mm = convert(checkpoint_spelling(hf_state, text), rules(text))
    return {k[len("text_decoder."):]: v for k, v in mm.items()}


def make_batch(vocab: int, b: int = 2, s: int = 10, seed: int = 3):
    """Ids, labels and fractional 3D positions, distinct per axis (every interleaved frequency matters)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=gen)
    labels = ids.clone()
    labels[:, :2] = -100
    t = torch.arange(s, dtype=torch.float32).expand(b, s)
    pos = torch.stack([t * 0.5, t // 2 + 1.25, (t % 5) * 0.75 + t // 3])
    return ids, labels, pos


def run_hf(model, lm_head, ids, pos, labels, text, pooled: bool = False):
    """Logits, LM loss, per-MoE-layer load-balancing losses, and the gradients of
    ``lm + coef * mean(per-layer)`` (``pooled``: of ``lm + coef * load_balancing_loss_func(all layers)``)."""
    from transformers.loss.loss_utils import ForCausalLMLoss
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import load_balancing_loss_func

    model.zero_grad(set_to_none=True)
    lm_head.zero_grad(set_to_none=True)
    out = model(input_ids=ids, position_ids=pos, output_router_logits=True)
    logits = lm_head(out.last_hidden_state)
    lm = ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1])
    per_layer = torch.stack([load_balancing_loss_func((r,), E, K) for r in out.router_logits])
    aux = load_balancing_loss_func(tuple(out.router_logits), E, K) if pooled else per_layer.mean()
    (lm + text.router_aux_loss_coef * aux).backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    grads["lm_head.weight"] = lm_head.weight.grad
    return logits.detach(), lm.detach(), per_layer.detach(), aux.detach(), grads


def build_mm(text, hf_model, lm_head, **kwargs):
    from mm_omni.models.text import TextDecoder

    model = TextDecoder(mm_text_config(text), **kwargs)
    state = {**hf_model.state_dict(), "lm_head.weight": lm_head.weight.detach()}
    missing, unexpected = model.load_state_dict(hf_to_mm(state, text), strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("._extra_state") for k in missing), missing
    return model


def run_mm(model, **inputs):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from mm_omni.models.text.moe import load_balancing_losses

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))  # the aux gradient unscaled (as one micro-batch)
    load_balancing_losses(model.config.num_layers)  # what other tests left in megatron's tracker: dropped
    model.zero_grad(set_to_none=True)
    out = model(return_logits=True, **inputs)
    out.loss.backward()
    tracked = load_balancing_losses(model.config.num_layers)
    return out.logits.detach(), out.loss.detach(), tracked, {k: p.grad for k, p in model.named_parameters()}


def check(text, hf, mm):
    hf_logits, hf_lm, _, _, hf_grads = hf
    mm_logits, mm_lm, _, mm_grads = mm
    errs = {"logits": rel_err(mm_logits, hf_logits), "lm_loss": rel_err(mm_lm, hf_lm)}
    expected = hf_to_mm(hf_grads, text)
    assert set(expected) == set(mm_grads), set(expected) ^ set(mm_grads)
    errs.update({k: rel_err(mm_grads[k], g) for k, g in expected.items()})
    worst = max(errs, key=errs.get)
    assert errs[worst] < TOL, f"{worst}: rel err {errs[worst]:.2e}"
    return errs


@pytest.fixture(scope="module")
def all_moe():
    init_megatron()
    text = hf_text_config()
    hf_model, lm_head = build_hf(text)
    return text, hf_model, lm_head, build_mm(text, hf_model, lm_head)


def test_moe_decoder_matches_transformers(all_moe):
    text, hf_model, lm_head, model = all_moe
    ids, labels, pos = make_batch(text.vocab_size)
    hf = run_hf(hf_model, lm_head, ids, pos, labels, text)
    mm = run_mm(model, input_ids=ids, position_ids=pos, labels=labels)
    check(text, hf, mm)
    # megatron's per-layer value (recorded / coeff) is transformers' per-layer formula / top-k
    per_layer = hf[2]
    assert rel_err(mm[2] * K, per_layer) < TOL, (mm[2] * K, per_layer)


def test_aux_loss_gradient_is_not_negligible(all_moe):
    """Without the load-balancing term the router gradients differ well beyond TOL: the check above sees it."""
    text, hf_model, lm_head, _ = all_moe
    ids, labels, pos = make_batch(text.vocab_size)
    with_aux = run_hf(hf_model, lm_head, ids, pos, labels, text)[4]
    without = run_hf(hf_model, lm_head, ids, pos, labels, hf_text_config(router_aux_loss_coef=0.0))[4]
    name = "layers.1.mlp.gate.weight"
    assert rel_err(without[name], with_aux[name]) > 100 * TOL


def test_packed_rows_match_transformers(all_moe):
    """Two sequences packed into one ``cu_seqlens`` row: each gets transformers' logits of its own row."""
    text, hf_model, lm_head, model = all_moe
    ids, labels, pos = make_batch(text.vocab_size)
    hf = run_hf(hf_model, lm_head, ids, pos, labels, text)
    cu = torch.tensor([0, ids.shape[1], 2 * ids.shape[1]])
    mm = run_mm(model, input_ids=ids.reshape(1, -1), position_ids=pos.reshape(3, 1, -1), labels=labels.reshape(1, -1),
                cu_seqlens=cu)
    mm = (mm[0].reshape(hf[0].shape),) + mm[1:]
    check(text, hf, mm)


def test_one_moe_layer_equals_pooled_aux_loss():
    """Dense layers 0 and 2 around one MoE layer: the trained loss is transformers' pooled one exactly."""
    init_megatron()
    text = hf_text_config(mlp_only_layers=[0, 2])
    hf_model, lm_head = build_hf(text, seed=5)
    model = build_mm(text, hf_model, lm_head)
    assert [type(layer.mlp).__name__ for layer in model.decoder.layers] == ["MLP", "MoELayer", "MLP"]
    ids, labels, pos = make_batch(text.vocab_size, seed=7)
    hf = run_hf(hf_model, lm_head, ids, pos, labels, text, pooled=True)
    mm = run_mm(model, input_ids=ids, position_ids=pos, labels=labels)
    check(text, hf, mm)
    assert mm[2][0] == 0 and mm[2][2] == 0
    assert rel_err(mm[2][1] * K, hf[3]) < TOL  # hf[3]: the pooled load_balancing_loss_func value


@pytest.mark.parametrize("head_dim,section", [(32, [6, 5, 5]), (128, [24, 20, 20])])
def test_interleaved_mrope_matches_transformers(head_dim, section):
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeThinkerTextRotaryEmbedding

    from mm_omni.models.common.rotary import interleaved_mrope_freqs, mrope_freqs

    text = hf_text_config(head_dim=head_dim, rope_parameters={
        "rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section, "interleaved": True})
    _, _, pos = make_batch(64, b=2, s=37)
    pos = pos * 3.1  # large, fractional positions
    cos, sin = Qwen3OmniMoeThinkerTextRotaryEmbedding(text)(torch.zeros(1, dtype=torch.float32), pos)
    freqs = interleaved_mrope_freqs(pos, head_dim, section, 1000000.0)[:, :, 0].transpose(0, 1)  # [b, s, d]
    assert rel_err(freqs.cos(), cos) < 1e-6 and rel_err(freqs.sin(), sin) < 1e-6
    # the chunked layout differs (the interleaving is what is checked), and it is unchanged by this variant
    chunked = mrope_freqs(pos, head_dim, section, 1000000.0)[:, :, 0].transpose(0, 1)
    assert rel_err(chunked.cos(), cos) > 1e-2


def test_moe_config_errors_name_the_field():
    from mm_omni.config.model import TextDecoderConfig

    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, vocab_size=64,
                mrope_section=[2, 3, 3], gated_linear_unit=True, num_moe_experts=4, moe_ffn_hidden_size=16)
    with pytest.raises(ValueError, match="moe_router_topk=5"):
        TextDecoderConfig(**base, moe_router_topk=5)
    with pytest.raises(ValueError, match="moe_layer_freq"):
        TextDecoderConfig(**base, moe_layer_freq=[1, 0, 1])
    with pytest.raises(ValueError, match="moe_ffn_hidden_size"):
        TextDecoderConfig(**{**base, "moe_ffn_hidden_size": None})
    with pytest.raises(ValueError, match="mrope_section"):
        TextDecoderConfig(**base, kv_channels=32)  # head_dim 32: sections must sum to 16
