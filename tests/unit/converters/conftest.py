"""Tiny random Hugging Face Qwen2.5-Omni checkpoints (thinker + talker + token2wav), nothing downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_thinker_config

_TALKER = dict(vocab_size=64, embedding_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1, head_dim=16,
               rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
_DIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, emb_dim=16, num_embeds=32,
            mel_dim=8, enc_emb_dim=8, enc_dim=8, enc_channels=[16, 16, 16, 16, 48], enc_attention_channels=8,
            enc_se_channels=8, look_ahead_layers=[1], look_backward_layers=[0])
_BIGVGAN = dict(mel_dim=8, upsample_initial_channel=16, upsample_rates=[2, 2], upsample_kernel_sizes=[4, 4],
                resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3, 5]])


def make_hf_checkpoint(path: Path, seed: int = 0, perturb: float | None = None, **thinker_overrides) -> Path:
    """save_pretrained of a random full model: bf16 thinker/talker, fp32 token2wav (as transformers keeps it),
    sharded so that several files and an index exist. Every tensor is replaced by N(0, 1) noise, or with
    ``perturb`` the initialised weights get N(0, perturb) added (activations stay in a sane range)."""
    import transformers
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniConfig
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniForConditionalGeneration

    transformers.logging.set_verbosity_error()  # tiny vocabularies trip token-id range warnings
    thinker = tiny_thinker_config(**thinker_overrides)
    cfg = Qwen2_5OmniConfig(thinker_config=thinker.to_dict(), talker_config=_TALKER,
                            token2wav_config=dict(dit_config=_DIT, bigvgan_config=_BIGVGAN), enable_audio_output=True)
    torch.manual_seed(seed)
    model = Qwen2_5OmniForConditionalGeneration(cfg)
    with torch.no_grad():  # norms init to 1 and biases to 0: make every tensor distinct
        for p in model.parameters():
            p.copy_(torch.randn_like(p) if perturb is None else p + perturb * torch.randn_like(p))
    model.thinker.to(torch.bfloat16)
    model.talker.to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="100KB")
    (path / "tokenizer_config.json").write_text('{"tokenizer_class": "Qwen2Tokenizer"}\n')  # a side file to copy
    # the speaker prompts from_pretrained of the full model loads (values only matter for speech output)
    torch.save({"Chelsie": {"bos_token": 0, "cond": torch.zeros(1, 8), "ref_mel": torch.zeros(1, 4, 8)}},
               path / "spk_dict.pt")
    return path


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("hf") / "Qwen2.5-Omni-tiny")


@pytest.fixture(scope="session")
def tied_hf_dir(tmp_path_factory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("hf_tied") / "tiny-tied", seed=1, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def sane_hf_dir(tmp_path_factory) -> Path:
    """Initialised weights plus small noise: activations in a trained model's range, so an fp32 comparison of
    outputs measures the weights, not the chaos of N(0, 1) layers (which amplify fp32 rounding to ~1e-4)."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("hf_sane") / "tiny-sane", seed=2, perturb=0.02)
