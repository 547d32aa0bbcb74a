"""Qwen3-Omni's AuT audio encoder (the thinker's ``audio_tower``) on megatron-core.

``AuTEncoder`` is an ``audio_encoder`` whose ``encoder`` holds ``conv2d1..3`` (3x3, stride 2, padding 1,
``downsample_hidden_size`` channels, erf GELU after each), ``conv_out`` (channels x remaining mel bins ->
``d_model``, no bias), ``blocks.layers.N...`` (megatron-core layers: pre-LayerNorm, MHA with q/k/v biases,
an ungated MLP with the config's activation), ``ln_post``, ``proj1`` and ``proj2`` (with the same
activation between them). Sinusoidal positions are added per chunk (restarting at 0) after ``conv_out``.
All chunks of all clips go through the convolutions together and every layer runs one attention call
over all windows (``cu_seqlens``); see :mod:`mm_omni.models.audio_aut.layout`.

Its items are clips (:class:`~mm_omni.models.audio.items.ClipItems`): a clip costs its valid mel frames and
yields :func:`~mm_omni.models.audio_aut.layout.aut_output_lengths` tokens.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock

from mm_omni.models.audio.encoder import audio_transformer_config
from mm_omni.models.audio.front_end import gather_chunks, sinusoid_table
from mm_omni.models.audio.items import ClipItems
from mm_omni.models.audio_aut.config import AuTEncoderConfig, conv_frames
from mm_omni.models.audio_aut.layout import AuTLayout, aut_layout, aut_output_lengths, window_params
from mm_omni.models.common.layer_spec import transformer_layer_spec
from mm_omni.models.common.transformer_config import ACTIVATIONS
from mm_omni.platform import get_platform


class AuTTransformer(MegatronModule):
    """Conv front end + per-chunk positions + windowed transformer blocks + ``ln_post -> proj1 -> act -> proj2``."""

    def __init__(self, cfg: AuTEncoderConfig, pg_collection=None):
        get_platform()  # installs the CPU adapter before megatron modules are built
        config = audio_transformer_config(cfg)
        super().__init__(config=config)
        self.cfg = cfg
        d, c, dtype = cfg.d_model, cfg.downsample_hidden_size, config.params_dtype
        self.conv2d1 = torch.nn.Conv2d(1, c, 3, 2, padding=1, dtype=dtype)
        self.conv2d2 = torch.nn.Conv2d(c, c, 3, 2, padding=1, dtype=dtype)
        self.conv2d3 = torch.nn.Conv2d(c, c, 3, 2, padding=1, dtype=dtype)
        self.conv_out = torch.nn.Linear(c * conv_frames(cfg.num_mel_bins), d, bias=False, dtype=dtype)
        # fixed, not trained, and not in transformers' state dict either (non-persistent there too)
        self.register_buffer("positional_embedding", sinusoid_table(cfg.max_source_positions, d), persistent=False)
        self.blocks = TransformerBlock(config, transformer_layer_spec(AttnMaskType.no_mask), post_layer_norm=False,
                                       pg_collection=pg_collection)
        self.graphed_blocks = None  # common.cuda_graphs.enable_encoder_cuda_graphs turns it on (CUDA only)
        self.ln_post = torch.nn.LayerNorm(d, eps=cfg.layernorm_epsilon, dtype=dtype)
        self.proj1 = torch.nn.Linear(d, d, dtype=dtype)
        self.act = ACTIVATIONS[cfg.activation_func]
        self.proj2 = torch.nn.Linear(d, cfg.output_dim, dtype=dtype)

    def layout(self, feature_lens: torch.Tensor) -> AuTLayout:
        return aut_layout(feature_lens, self.cfg.n_window, self.cfg.n_window_infer)

    def forward(self, input_features: torch.Tensor, feature_lens: torch.Tensor) -> torch.Tensor:
        layout = self.layout(feature_lens).to(input_features.device)
        chunks = gather_chunks(input_features, feature_lens.to(input_features.device), layout.chunks)
        chunks = chunks[..., :layout.width]
        if self.graphed_blocks is not None and self.graphed_blocks.usable(chunks):
            # everything after the gather in one graph per (chunks, width, tokens, windows, longest window):
            # the chunks and the layout's index tensors are its inputs
            def fn(chunks, token_index, cu_seqlens, max_window=layout.max_window):
                return self.encode_chunks(chunks, token_index, cu_seqlens, max_window)

            return self.graphed_blocks.call(("aut", layout.max_window), self, fn, chunks, layout.token_index,
                                            layout.cu_seqlens)
        return self.encode_chunks(chunks, layout.token_index, layout.cu_seqlens, layout.max_window)

    def encode_chunks(self, chunks: torch.Tensor, token_index: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_window: int) -> torch.Tensor:
        """Convolutions -> blocks (attention inside each window) -> ``ln_post`` -> ``proj1`` -> act -> ``proj2``."""
        hidden = self.front_end(chunks, token_index)
        hidden = self.blocks(hidden[:, None], attention_mask=None, packed_seq_params=window_params(cu_seqlens, max_window))
        return self.proj2(self.act(self.proj1(self.ln_post(hidden[:, 0]))))

    def front_end(self, chunks: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
        """[C, mel, width] zero-padded chunks -> the kept tokens [T, d_model], positions added per chunk."""
        chunks = chunks[:, None].to(self.conv2d1.weight.dtype)  # one input channel
        parts = []
        for part in chunks.split(self.cfg.conv_chunksize):  # bounds the convolutions' memory, as transformers
            for conv in (self.conv2d1, self.conv2d2, self.conv2d3):
                part = F.gelu(conv(part))
            parts.append(part)
        hidden = torch.cat(parts)  # [C, channels, mel', grid]
        n, c, f, t = hidden.shape
        hidden = self.conv_out(hidden.permute(0, 3, 1, 2).reshape(n, t, c * f))  # channel-major, then mel
        hidden = hidden + self.positional_embedding[:t].to(hidden.dtype)
        return hidden.reshape(n * t, -1).index_select(0, token_index)


class AuTEncoder(ClipItems, MegatronModule):
    """The AuT ``audio_encoder``.

    ``forward(input_features, feature_lens)`` takes the mel features padded per clip, ``[n_audio, mel, T_max]``,
    or as transformers' flat valid frames ``[mel, sum(feature_lens)]`` (what its thinker makes of
    ``feature_attention_mask``), and returns the tokens of all clips concatenated,
    ``[sum(aut_output_lengths(feature_lens)), output_dim]``, as transformers' ``last_hidden_state``.
    Keep ``feature_lens`` on the CPU: the layout is built there (a device tensor costs one sync).
    """

    def __init__(self, cfg: AuTEncoderConfig, pg_collection=None):
        encoder = AuTTransformer(cfg, pg_collection=pg_collection)
        super().__init__(config=encoder.config)
        self.cfg = cfg
        self.encoder = encoder

    def forward(self, input_features: torch.Tensor, feature_lens: torch.Tensor,
                aftercnn_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
        # aftercnn_lens is accepted for the shared call signature; the lengths come from feature_lens
        return self.encoder(input_features, feature_lens)

    # -- items (ClipItems): a clip, its valid mel frames; the token rule and dummy input are this encoder's ---
    def item_tokens(self, feature_lens: torch.Tensor) -> list[int]:
        return aut_output_lengths(feature_lens.cpu().long(), self.cfg.n_window).tolist()

    def dummy_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One clip of 8 zero mel frames (one audio token)."""
        weight = self.encoder.conv2d1.weight
        feats = torch.zeros(1, self.cfg.num_mel_bins, 8, dtype=weight.dtype, device=weight.device)
        return feats, torch.tensor([8])
