"""Qwen2.5-VL vision encoder (Qwen2.5-Omni's ``visual``) on megatron-core.

``VisionEncoder`` is the omni model's ``image_encoder``: ``encoder`` (patch embedding + ViT
blocks) and ``projector`` (patch merger), under MindSpeed-MM's state-dict names
(``image_encoder.encoder.patch_embed.proj.weight``, ``image_encoder.encoder.blocks.layers.N...``,
``image_encoder.projector.{layernorm,encoder.linear_fc1,encoder.linear_fc2}...``).

One forward handles any mix of images and videos (``grid_thw`` rows of any size): the patches of
the whole batch are reordered into window order once, every layer runs ONE attention call over all
windows (or, in the ``fullatt_block_indexes`` layers, over all frames) through ``cu_seqlens``, and
the merged tokens are put back in the input order after the projector.

Its items (:class:`mm_omni.models.common.encoder_api.ItemEncoder`) are the images and videos of a
batch: an item's patches are its ``t * h * w`` rows of ``pixel_values`` and it yields one token per
merge block.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock

from mm_omni.config.model import VisionEncoderConfig, VisionProjectorConfig
from mm_omni.models.common.layer_spec import transformer_layer_spec
from mm_omni.models.common.rotary import vision_rotary_freqs
from mm_omni.models.vision.config import vision_transformer_config
from mm_omni.models.vision.items import PatchItems
from mm_omni.models.vision.patch_embed import PatchEmbed
from mm_omni.models.vision.projector import PatchMerger
from mm_omni.models.vision.window_index import VisionLayout, vision_layout
from mm_omni.platform import get_platform


class VisionTransformer(MegatronModule):
    """Patch embedding + 2D-RoPE transformer blocks (window / full attention); no final norm.

    :meth:`forward` returns the hidden states in *window order*, with the layout that produced
    them, so the projector can merge them before the order is restored (merge blocks stay whole).
    """

    def __init__(self, cfg: VisionEncoderConfig, pg_collection=None):
        get_platform()  # installs the CPU adapter before megatron modules are built
        config = vision_transformer_config(cfg)
        super().__init__(config=config)
        self.cfg = cfg
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.patch_embed = PatchEmbed(cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size,
                                      cfg.hidden_size, dtype=config.params_dtype)
        self.blocks = TransformerBlock(config, transformer_layer_spec(AttnMaskType.no_mask),
                                       post_layer_norm=False, pg_collection=pg_collection)
        self.graphed_blocks = None  # common.cuda_graphs.enable_encoder_cuda_graphs turns it on (CUDA only)

    def layout(self, grid_thw: torch.Tensor) -> VisionLayout:
        cfg = self.cfg
        return vision_layout(grid_thw, cfg.spatial_merge_size, cfg.window_attn_size, cfg.patch_size)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, VisionLayout]:
        host = self.layout(grid_thw)
        if pixel_values.shape[0] != host.num_patches:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but grid_thw "
                             f"{grid_thw.tolist()} describes {host.num_patches}")
        layout = host.to(pixel_values.device)  # before any kernel is queued; asynchronous
        unit = self.cfg.spatial_merge_size**2
        hidden = self.patch_embed(pixel_values)
        # whole merge blocks move together, so the projector still sees each block's m^2 patches adjacent
        hidden = hidden.view(-1, unit, hidden.shape[-1]).index_select(0, layout.window_index)
        hidden = hidden.view(host.num_patches, 1, -1)  # megatron's [s, b=1, h]
        # one rotary table for the whole batch, already in window order; every layer reuses it
        freqs = vision_rotary_freqs(layout.pos_hw, self.head_dim, self.cfg.rope_theta)
        if self.graphed_blocks is not None and self.graphed_blocks.usable(hidden):
            # one graph per (patches, windows, frames, longest window / frame); the tables are its inputs
            def block_kwargs(freqs, cu_window, cu_frames, maxes=(host.max_window_seqlen, host.max_seqlen)):
                params = VisionLayout(None, None, None, cu_window, cu_frames, *maxes)
                return dict(rotary_pos_emb=freqs,
                            packed_seq_params=params.packed_seq_params(self.cfg.fullatt_block_indexes))

            key = ("vision", host.max_window_seqlen, host.max_seqlen)
            hidden = self.graphed_blocks(key, block_kwargs, hidden, freqs, layout.cu_window_seqlens, layout.cu_seqlens)
            return hidden[:, 0], layout
        packed = layout.packed_seq_params(self.cfg.fullatt_block_indexes)
        hidden = self.blocks(hidden, attention_mask=None, rotary_pos_emb=freqs, packed_seq_params=packed)
        return hidden[:, 0], layout


class VisionEncoder(PatchItems, MegatronModule):
    """``image_encoder``: pixel patches + ``grid_thw`` -> LLM-width tokens, one per merge block.

    ``forward(pixel_values [n_patches, C*T*P*P], grid_thw [n_media, 3])`` returns
    ``[n_patches / spatial_merge_size^2, llm_hidden]`` in the input order, exactly as transformers'
    ``Qwen2_5OmniVisionEncoder`` (its ``pooler_output``). Keep ``grid_thw`` on the CPU (as the
    collator makes it): the index bookkeeping runs there, and a device ``grid_thw`` costs one sync.
    """

    def __init__(self, encoder_cfg: VisionEncoderConfig, projector_cfg: VisionProjectorConfig,
                 pg_collection=None):
        if projector_cfg.input_size != encoder_cfg.hidden_size:
            raise ValueError(
                f"vision_projector.input_size={projector_cfg.input_size} must equal "
                f"vision_encoder.hidden_size={encoder_cfg.hidden_size}"
            )
        encoder = VisionTransformer(encoder_cfg, pg_collection=pg_collection)
        super().__init__(config=encoder.config)
        self.encoder = encoder
        tp_group = None if pg_collection is None else pg_collection.tp
        self.projector = PatchMerger(projector_cfg, encoder_cfg.spatial_merge_size, tp_group=tp_group)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        hidden, layout = self.encoder(pixel_values, grid_thw)
        merged = self.projector(hidden)
        return merged.index_select(0, layout.reverse_index)
