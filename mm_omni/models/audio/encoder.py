"""Qwen2.5-Omni's Whisper-style audio encoder on megatron-core.

``AudioEncoder`` is the omni model's ``audio_encoder``; its ``encoder`` holds the parameters under
MindSpeed-MM's names (``audio_encoder.encoder.{conv1,conv2,blocks.layers.N...,ln_post,proj,
audio_bos_eos_token}``). The blocks are megatron-core's ``TransformerBlock`` (pre-LayerNorm, an ungated
MLP with biases and the config's ``activation_func``, GELU in Qwen2.5-Omni; no final norm: ``ln_post``
comes after the pooling). All chunks of all clips go through one attention call per layer
(``cu_seqlens`` of the chunks).

Its items (:class:`mm_omni.models.common.encoder_api.ItemEncoder`) are the clips of a batch: a clip costs
its valid mel frames and yields ``((L - 1) // 2 + 1 - 2) // 2 + 1`` tokens for ``L`` of them.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from mm_omni.config.model import AudioEncoderConfig
from mm_omni.models.audio.front_end import (
    ChunkLayout, chunk_layout, conv_output_lengths, conv_stem, gather_chunks, sinusoid_table,
)
from mm_omni.models.audio.items import ClipItems
from mm_omni.models.common.layer_spec import transformer_layer_spec
from mm_omni.models.common.transformer_config import megatron_transformer_config
from mm_omni.platform import get_platform

def audio_transformer_config(cfg: AudioEncoderConfig) -> TransformerConfig:
    """megatron ``TransformerConfig`` of the audio blocks (Whisper: MHA, LayerNorm, an ungated MLP, biases)."""
    if cfg.hidden_size != cfg.d_model:
        raise ValueError(f"audio_encoder.hidden_size={cfg.hidden_size} must equal d_model={cfg.d_model}")
    # q and v have biases; k's is a slot of the fused QKV bias loaded as zero (transformers' k_proj has none).
    # A key bias adds q.b to every score of a query alike, so softmax ignores it and its gradient is zero.
    return megatron_transformer_config(cfg, num_query_groups=cfg.num_attention_heads, add_qkv_bias=True)


class OmniAudioTransformer(MegatronModule):
    """Conv stem + sinusoidal positions + chunked transformer blocks + pooling + ``ln_post`` + ``proj``."""

    def __init__(self, cfg: AudioEncoderConfig, pg_collection=None):
        get_platform()  # installs the CPU adapter before megatron modules are built
        config = audio_transformer_config(cfg)
        super().__init__(config=config)
        d, dtype = cfg.d_model, config.params_dtype
        if cfg.n_window > cfg.max_source_positions:  # a full chunk's n_window tokens each need a position
            raise ValueError(f"audio_encoder.n_window={cfg.n_window} exceeds max_source_positions="
                             f"{cfg.max_source_positions}: lower n_window")
        self.n_window = cfg.n_window
        # no input scaling: transformers computes scale_embedding's factor but never applies it (model.json
        # refuses true)
        self.conv1 = torch.nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1, dtype=dtype)
        self.conv2 = torch.nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1, dtype=dtype)
        # fixed, not trained, and not in transformers' state dict either (non-persistent there too)
        self.register_buffer("positional_embedding", sinusoid_table(cfg.max_source_positions, d),
                             persistent=False)
        self.blocks = TransformerBlock(
            config, transformer_layer_spec(AttnMaskType.no_mask), post_layer_norm=False,
            pg_collection=pg_collection,
        )
        self.graphed_blocks = None  # common.cuda_graphs.enable_encoder_cuda_graphs turns it on (CUDA only)
        self.ln_post = torch.nn.LayerNorm(d, eps=cfg.layernorm_epsilon, dtype=dtype)
        self.proj = torch.nn.Linear(d, cfg.output_dim, dtype=dtype)
        # Unused by transformers' forward too; kept so checkpoints round-trip. Frozen: a trainable
        # parameter that never gets a gradient stalls megatron DDP's overlapped grad reduce.
        self.audio_bos_eos_token = torch.nn.Embedding(2, cfg.output_dim, dtype=dtype)
        self.audio_bos_eos_token.weight.requires_grad_(False)

    def forward(self, input_features: torch.Tensor, feature_lens: torch.Tensor) -> torch.Tensor:
        # built where feature_lens are: host lens (the collator's) cost no device sync
        layout = chunk_layout(feature_lens, self.n_window).to(input_features.device)
        if input_features.dim() == 2:  # the flat layout indexes by clip offsets
            feature_lens = feature_lens.to(input_features.device)
        chunks = gather_chunks(input_features, feature_lens, layout)
        inputs = (chunks, layout.chunk_frames, layout.token_index, layout.cu_seqlens, layout.pool_index)
        if self.graphed_blocks is not None and self.graphed_blocks.usable(chunks):
            # everything after the gather in one graph per (chunks, tokens, pooled tokens, longest chunk):
            # the layout's index tensors are its inputs
            def fn(*tensors, max_len=layout.max_chunk_tokens):
                return self.encode_chunks(*tensors, max_len=max_len)

            return self.graphed_blocks.call(("audio", layout.max_chunk_tokens), self, fn, *inputs)
        return self.encode_chunks(*inputs, max_len=layout.max_chunk_tokens)

    def encode_chunks(self, chunks, chunk_frames, token_index, cu_seqlens, pool_index, max_len: int) -> torch.Tensor:
        """Conv stem -> blocks (attention inside each chunk) -> pair pooling -> ``ln_post`` -> ``proj``."""
        stem_layout = ChunkLayout(self.n_window * 2, None, None, chunk_frames, token_index, cu_seqlens, max_len, pool_index)
        hidden = conv_stem(self.conv1, self.conv2, chunks, stem_layout, self.positional_embedding)
        hidden = self.blocks(hidden[:, None], attention_mask=None,
                             packed_seq_params=stem_layout.packed_seq_params())[:, 0]
        pooled = (hidden[pool_index] + hidden[pool_index + 1]) / 2
        return self.proj(self.ln_post(pooled))


class AudioEncoder(ClipItems, MegatronModule):
    """The omni model's ``audio_encoder``.

    ``forward(input_features, feature_lens)`` takes the mel features either padded per clip,
    ``[n_audio, mel, T_max]``, or as transformers' flat valid frames ``[mel, sum(feature_lens)]``,
    encodes every clip at its real length (never padded to 30 s) and returns the audio tokens of all
    clips concatenated, ``[sum(((L - 1) // 2 + 1) // 2), output_dim]``.
    """

    def __init__(self, cfg: AudioEncoderConfig, pg_collection=None):
        encoder = OmniAudioTransformer(cfg, pg_collection=pg_collection)
        super().__init__(config=encoder.config)
        self.cfg = cfg
        self.encoder = encoder

    def forward(self, input_features: torch.Tensor, feature_lens: torch.Tensor,
                aftercnn_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
        # aftercnn_lens is accepted for transformers' call signature; like transformers, the
        # lengths after the convs are derived from feature_lens.
        return self.encoder(input_features, feature_lens)

    # -- items (ClipItems): a clip, its valid mel frames; the token rule and dummy input are this encoder's ---
    def item_tokens(self, feature_lens: torch.Tensor) -> list[int]:
        return conv_output_lengths(feature_lens.cpu())[1].tolist()

    def dummy_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One clip of 4 zero mel frames (one audio token)."""
        weight = self.encoder.conv1.weight
        feats = torch.zeros(1, self.cfg.num_mel_bins, 4, dtype=weight.dtype, device=weight.device)
        return feats, torch.tensor([4], device=weight.device)
