"""Qwen3-VL-style vision encoder (Qwen3-Omni's ``visual``) on megatron-core.

``Qwen3VisionEncoder`` holds ``encoder`` (patch embedding with bias, learned position table, 2D-RoPE
blocks), ``projector`` (the final merger: LayerNorm per patch, then an MLP over each ``m x m`` block) and
``deepstack_projectors`` (one merger per ``deepstack_visual_indexes`` entry, LayerNorm over the merged
vector), under the names ``image_encoder.encoder.{patch_embed.proj,pos_embed,blocks.layers.N...}``,
``image_encoder.projector...`` and ``image_encoder.deepstack_projectors.K...``.

The patches stay in the processor's merge-block order; every layer runs one attention call over all
frames of the batch through ``cu_seqlens`` (one segment per frame). The pieces shared with the Qwen2.5-VL
stack are used as they are: the patch embedding, the merger, the 2D rotary table, the block translation
and the items (:class:`~mm_omni.models.vision.items.PatchItems`).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.utils import make_viewless_tensor

from mm_omni.config.model import VisionProjectorConfig
from mm_omni.models.common.layer_spec import transformer_layer_spec
from mm_omni.models.common.rotary import vision_rotary_freqs
from mm_omni.models.vision.config import vision_transformer_config
from mm_omni.models.vision.items import PatchItems
from mm_omni.models.vision.patch_embed import PatchEmbed
from mm_omni.models.vision.projector import PatchMerger
from mm_omni.models.vision_qwen3.config import Qwen3VisionEncoderConfig
from mm_omni.models.vision_qwen3.layout import Qwen3VisionLayout, frame_params, qwen3_vision_layout
from mm_omni.platform import get_platform


class Qwen3VisionTransformer(MegatronModule):
    """Patch embedding + interpolated learned positions + 2D-RoPE blocks (attention per frame); no final norm.

    :meth:`forward` returns the last layer's hidden states and those of the ``deepstack_visual_indexes``
    layers (``{layer: hidden}``), all ``[n_patches, hidden]`` in the input order.
    """

    def __init__(self, cfg: Qwen3VisionEncoderConfig, pg_collection=None):
        get_platform()  # installs the CPU adapter before megatron modules are built
        config = vision_transformer_config(cfg)
        super().__init__(config=config)
        self.cfg = cfg
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.patch_embed = PatchEmbed(cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.hidden_size,
                                      dtype=config.params_dtype, bias=True)
        self.pos_embed = torch.nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size, dtype=config.params_dtype)
        self.blocks = TransformerBlock(config, transformer_layer_spec(AttnMaskType.no_mask),
                                       post_layer_norm=False, pg_collection=pg_collection)
        if len(self.blocks.layers) != cfg.num_layers:
            raise ValueError(f"vision_encoder.num_layers={cfg.num_layers} but this rank builds "
                             f"{len(self.blocks.layers)}: a pipeline split of the Qwen3 vision encoder is not "
                             "supported (the deepstack features of every stage are needed): run it unsplit")
        self.taps = frozenset(cfg.deepstack_visual_indexes)
        self.graphed_blocks = None  # common.cuda_graphs.enable_encoder_cuda_graphs turns it on (CUDA only)

    def layout(self, grid_thw: torch.Tensor) -> Qwen3VisionLayout:
        return qwen3_vision_layout(grid_thw, self.cfg.spatial_merge_size, self.cfg.num_position_embeddings)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
                ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        host = self.layout(grid_thw)
        if pixel_values.shape[0] != host.num_patches:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but grid_thw "
                             f"{grid_thw.tolist()} describes {host.num_patches}")
        layout = host.to(pixel_values.device)
        hidden = self.patch_embed(pixel_values)
        # the four bilinear taps of each patch, weighted in fp32 like transformers, then in the model's dtype
        positions = (self.pos_embed(layout.interp_index) * layout.interp_weight[:, :, None]).sum(1)
        hidden = (hidden + positions.to(hidden.dtype))[:, None]  # megatron's [s, b=1, h]
        freqs = vision_rotary_freqs(layout.pos_hw, self.head_dim, self.cfg.rope_theta)
        if self.graphed_blocks is not None and self.graphed_blocks.usable(hidden):
            # one graph per (patches, frames, longest frame): the hidden states, the rotary table and the
            # frame boundaries are its inputs; the last layer's output and the tapped layers' come back side
            # by side in one tensor
            def fn(hidden, freqs, cu_seqlens, max_len=host.max_seqlen):
                out, tapped = self.run_blocks(hidden, freqs, frame_params(cu_seqlens, max_len))
                return torch.cat([out] + [tapped[i] for i in sorted(tapped)], dim=-1)

            both = self.graphed_blocks.call(("qwen3_vision", host.max_seqlen), self.blocks, fn, hidden, freqs,
                                            layout.cu_seqlens)
            out, *taps = both.split(self.cfg.hidden_size, dim=-1)
            return out, dict(zip(sorted(self.taps), taps))
        return self.run_blocks(hidden, freqs, layout.packed_seq_params())

    def run_blocks(self, hidden: torch.Tensor, freqs: torch.Tensor, packed) -> tuple[torch.Tensor, dict]:
        """The layers one by one (what TransformerBlock.forward does without recompute, which the config
        refuses): the deepstack layers' outputs are needed with their graph. ``[n, h]`` and ``{layer: [n, h]}``."""
        hidden = make_viewless_tensor(inp=hidden, requires_grad=True, keep_graph=True)
        tapped = {}
        for layer in self.blocks.layers:
            hidden, _ = layer(hidden_states=hidden, attention_mask=None, rotary_pos_emb=freqs,
                              packed_seq_params=packed)
            index = layer.layer_number - 1  # global, 0-based
            if index in self.taps:
                tapped[index] = hidden[:, 0]
        return hidden[:, 0], tapped


class Qwen3VisionEncoder(PatchItems, MegatronModule):
    """``image_encoder``: pixel patches + ``grid_thw`` -> LLM-width tokens and the deepstack features.

    ``features(pixel_values [n_patches, C*T*P*P], grid_thw [n_media, 3])`` returns ``(merged, deepstack)``:
    ``merged`` ``[n_patches / m^2, llm_hidden]`` (transformers' ``pooler_output``) and ``deepstack`` a list
    of as many tensors of that shape, one per ``deepstack_visual_indexes`` layer in layer order, each
    through the merger of its entry (transformers' ``deepstack_features``). ``forward`` returns them side
    by side, ``[n, llm_hidden * (1 + k)]``: one tensor, which the shared encoder code (item splits, dummy
    forwards, hetero gathers) handles as any encoder's output, and which the omni model reads as the
    features plus the decoder's layer additions (:func:`mm_omni.models.omni.merge_features`). Keep
    ``grid_thw`` on the CPU.
    """

    def __init__(self, encoder_cfg: Qwen3VisionEncoderConfig, projector_cfg: VisionProjectorConfig,
                 pg_collection=None):
        if projector_cfg.input_size != encoder_cfg.hidden_size:
            raise ValueError(f"vision_projector.input_size={projector_cfg.input_size} must equal "
                             f"vision_encoder.hidden_size={encoder_cfg.hidden_size}")
        encoder = Qwen3VisionTransformer(encoder_cfg, pg_collection=pg_collection)
        super().__init__(config=encoder.config)
        self.encoder = encoder
        tp_group = None if pg_collection is None else pg_collection.tp
        m = encoder_cfg.spatial_merge_size
        self.projector = PatchMerger(projector_cfg, m, tp_group=tp_group)
        self.deepstack_projectors = torch.nn.ModuleList(
            PatchMerger(projector_cfg, m, tp_group=tp_group, norm_merged=True)
            for _ in encoder_cfg.deepstack_visual_indexes)
        # merger k belongs to layer deepstack_visual_indexes[k]; outputs come in layer order (transformers')
        indexes = list(encoder_cfg.deepstack_visual_indexes)
        self.deepstack_order = [(layer, indexes.index(layer)) for layer in sorted(indexes)]

    def features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        hidden, tapped = self.encoder(pixel_values, grid_thw)
        deepstack = [self.deepstack_projectors[k](tapped[layer]) for layer, k in self.deepstack_order]
        return self.projector(hidden), deepstack

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        merged, deepstack = self.features(pixel_values, grid_thw)
        return torch.cat([merged, *deepstack], dim=-1) if deepstack else merged
