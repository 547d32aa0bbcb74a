"""Text decoder vs transformers' Qwen2.5-Omni ``language_model`` + ``lm_head``: fp32 CPU, rel err < 1e-5.

Same weights through the converter's keymap; logits (real tokens), loss (transformers'
``ForCausalLMLoss``) and every parameter gradient are compared for a right-padded batch whose rows
have different lengths, the same rows left-padded, the same rows packed into one ``cu_seqlens``
row, and a model with the output layer tied to the embedding. Positions are 3D (distinct on the
three M-RoPE axes) so each rotary section is checked.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_thinker_config
from tests.helpers import init_megatron, randomize_, rel_err  # noqa: F401 (re-exported to workers)

TOL = 1e-5
LENGTHS = (12, 7)  # two rows of different lengths


# --------------------------------------------------------------------------------------------
# weights: transformers -> MindSpeed-MM names
# --------------------------------------------------------------------------------------------
def hf_to_mm(hf_state: dict, thinker_cfg) -> dict:
    """Whole-thinker HF names (``model.language_model.*``, ``lm_head.*``, ...) -> MindSpeed-MM names."""
    from converters.common.convert import hf_state_to_mm
    from mm_omni.models.qwen2_5_omni.convert import SPEC

    return hf_state_to_mm(SPEC, thinker_cfg, hf_state)


def load_mm(model: torch.nn.Module, mm_state: dict, prefix: str) -> None:
    """Load ``prefix*`` tensors into ``model``; only megatron's ``_extra_state`` entries may be missing."""
    state = {k[len(prefix):]: v for k, v in mm_state.items() if k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith("._extra_state") for k in missing), missing


def compare_grads(hf_named_grads: dict, mm_named_grads: dict, thinker_cfg, hf_prefix: str = "") -> dict:
    """Map HF grads forward with the keymap and return {mm name: rel err}; the name sets must agree."""
    expected = hf_to_mm({hf_prefix + k: g for k, g in hf_named_grads.items()}, thinker_cfg)
    assert set(expected) == set(mm_named_grads), set(expected) ^ set(mm_named_grads)
    return {k: rel_err(mm_named_grads[k], g) for k, g in expected.items()}


# --------------------------------------------------------------------------------------------
# models and inputs
# --------------------------------------------------------------------------------------------
def build_hf_text(thinker_cfg, seed: int = 0):
    """transformers' thinker text model and ``lm_head`` (tied when the thinker config says so, as transformers does)."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerTextModel

    torch.manual_seed(seed)
    text = Qwen2_5OmniThinkerTextModel._from_config(thinker_cfg.text_config).float()
    lm_head = torch.nn.Linear(text.config.hidden_size, text.config.vocab_size, bias=False)
    torch.nn.init.normal_(lm_head.weight, std=0.02)
    randomize_(text, seed + 1)
    if thinker_cfg.tie_word_embeddings:
        lm_head.weight = text.embed_tokens.weight
    return text, lm_head


def hf_text_state(text, lm_head, tied: bool) -> dict:
    state = {f"model.language_model.{k}": v for k, v in text.state_dict().items()}
    if not tied:
        state["lm_head.weight"] = lm_head.weight.detach()
    return state


def build_mm_text(thinker_cfg, **kwargs):
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config
    from mm_omni.models.text import TextDecoder

    return TextDecoder(from_hf_thinker_config(thinker_cfg).text_decoder, **kwargs)


def make_rows(vocab: int, lengths=LENGTHS, seed: int = 2):
    """Token ids, labels (first 3 tokens of each row unlabelled) and 3D positions per row."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=gen)
        labels = ids.clone()
        labels[:3] = -100
        t = torch.arange(n)
        pos = torch.stack([t, t // 2 + 1, (t % 5) + t // 3])  # distinct per axis: every M-RoPE section matters
        rows.append((ids, labels, pos))
    return rows


def pad_rows(rows, left: bool = False):
    """[b, s] ids / labels / keep-mask and [3, b, s] positions; pads are id 0, label -100, position 1."""
    s = max(r[0].numel() for r in rows)
    b = len(rows)
    ids = torch.zeros(b, s, dtype=torch.long)
    labels = torch.full((b, s), -100)
    mask = torch.zeros(b, s, dtype=torch.long)
    pos = torch.ones(3, b, s, dtype=torch.long)
    for i, (r_ids, r_labels, r_pos) in enumerate(rows):
        n = r_ids.numel()
        sl = slice(s - n, s) if left else slice(0, n)
        ids[i, sl], labels[i, sl], mask[i, sl], pos[:, i, sl] = r_ids, r_labels, 1, r_pos
    return ids, labels, mask, pos


def pack_rows(rows):
    ids = torch.cat([r[0] for r in rows])[None]
    labels = torch.cat([r[1] for r in rows])[None]
    pos = torch.cat([r[2] for r in rows], 1)[:, None]
    cu = torch.tensor([0] + [r[0].numel() for r in rows]).cumsum(0)
    return ids, labels, pos, cu


def run_hf(text, lm_head, ids, mask, pos, labels):
    from transformers.loss.loss_utils import ForCausalLMLoss

    text.zero_grad(set_to_none=True)
    lm_head.zero_grad(set_to_none=True)
    hidden = text(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    logits = lm_head(hidden)
    loss = ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1])
    loss.backward()
    grads = {f"language_model.{k}": p.grad for k, p in text.named_parameters()}
    if lm_head.weight is not text.embed_tokens.weight:
        grads["lm_head.weight"] = lm_head.weight.grad
    return logits.detach(), loss.detach(), grads


def run_mm(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(return_logits=True, **inputs)
    out.loss.backward()
    grads = {f"text_decoder.{k}": p.grad for k, p in model.named_parameters()}
    return out.logits.detach(), out.loss.detach(), grads


def _hf_grads_to_thinker_names(grads: dict) -> dict:
    return {(k if k.startswith("lm_head") else f"model.{k}"): g for k, g in grads.items()}


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def setup(request):
    init_megatron()
    tied = request.param
    cfg = tiny_thinker_config(text={"tie_word_embeddings": tied}, tie_word_embeddings=tied)
    text, lm_head = build_hf_text(cfg)
    model = build_mm_text(cfg)
    assert model.share_embeddings_and_output_weights == tied
    load_mm(model, hf_to_mm(hf_text_state(text, lm_head, tied), cfg), "text_decoder.")
    rows = make_rows(cfg.text_config.vocab_size)
    ids, labels, mask, pos = pad_rows(rows)
    hf = run_hf(text, lm_head, ids, mask, pos, labels)
    return cfg, text, lm_head, model, rows, hf


def _check(cfg, hf, mm, valid: torch.Tensor, mm_valid: torch.Tensor = None):
    hf_logits, hf_loss, hf_grads = hf
    mm_logits, mm_loss, mm_grads = mm
    errs = {"logits": rel_err(mm_logits[mm_valid if mm_valid is not None else valid], hf_logits[valid]),
            "loss": rel_err(mm_loss, hf_loss)}
    errs.update(compare_grads(_hf_grads_to_thinker_names(hf_grads), mm_grads, cfg))
    worst = max(errs, key=errs.get)
    assert errs[worst] < TOL, f"{worst}: rel err {errs[worst]:.2e}"
    return errs


def test_right_padded_batch(setup):
    cfg, _, _, model, rows, hf = setup
    ids, labels, mask, pos = pad_rows(rows)
    mm = run_mm(model, input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
    _check(cfg, hf, mm, mask.bool())


def test_left_padded_batch(setup):
    cfg, text, lm_head, model, rows, _ = setup
    ids, labels, mask, pos = pad_rows(rows, left=True)
    hf = run_hf(text, lm_head, ids, mask, pos, labels)
    mm = run_mm(model, input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
    _check(cfg, hf, mm, mask.bool())


def test_packed_rows(setup):
    """One ``cu_seqlens`` row gives the padded batch's logits, loss and gradients."""
    cfg, _, _, model, rows, hf = setup
    ids, labels, pos, cu = pack_rows(rows)
    # the collator also sends an all-ones attention_mask with packed rows: it must be ignored
    mm = run_mm(model, input_ids=ids, position_ids=pos, labels=labels, cu_seqlens=cu, attention_mask=torch.ones_like(ids))
    _, _, mask, _ = pad_rows(rows)
    _check(cfg, hf, mm, mask.bool(), torch.ones_like(ids, dtype=torch.bool))


def test_loss_ignores_sequence_ends_when_packed():
    from mm_omni.models.text import shift_labels

    labels = torch.arange(1, 8)[None]
    shifted = shift_labels(labels, torch.tensor([0, 3, 7]))
    assert shifted.tolist() == [[2, 3, -100, 5, 6, 7, -100]]
