"""Qwen2.5-Omni thinker: encoders -> scatter into the text embeddings -> decoder -> loss.

``OmniModel`` holds ``image_encoder`` (:class:`VisionEncoder`: images and video frames),
``audio_encoder`` (:class:`AudioEncoder`) and ``text_decoder`` (:class:`TextDecoder`), so its state
dict carries MindSpeed-MM's names. Media features replace the embeddings of their placeholder tokens
(ids from :class:`OmniModelConfig`), in order of appearance, row-major over the batch, exactly as
transformers' ``masked_scatter`` does.

Dummy encoder forwards: when a micro-batch has no image/video (or no audio), that encoder still runs
on a tiny zero input and its output is added to the decoder input multiplied by zero. Every
parameter then gets a (zero) gradient on every rank, so DDP / the distributed optimizer see the same
parameter set everywhere (no hang, no "unused parameter"); the values and the loss are unchanged
(``x + 0 == x``). It goes through the decoder input rather than the loss so that it also works when
the loss lives on a later pipeline stage.
"""

from __future__ import annotations

import logging
from typing import Optional, Union

import torch
from megatron.core.transformer.module import MegatronModule

from mm_omni.config.model import OmniModelConfig
from mm_omni.models.text import DecoderOutput, TextDecoder
from mm_omni.platform import get_platform

logger = logging.getLogger(__name__)


class OmniModel(MegatronModule):
    """The thinker: ``forward`` returns the decoder's :class:`DecoderOutput` (loss, per-token loss, logits)."""

    def __init__(
        self,
        cfg: OmniModelConfig,
        pre_process: bool = True,
        post_process: bool = True,
        pg_collection=None,
        vp_stage: Optional[int] = None,
        dummy_encoder_forward: bool = True,
        text_config_overrides: Optional[dict] = None,
        encoder_parallel=None,
    ):
        get_platform()
        # the scatter positions of the encoders model.json has
        cfg.require_token_ids(*(["image_token_id", "video_token_id"] if cfg.image_encoder is not None else [])
                              + (["audio_token_id"] if cfg.audio_encoder is not None else []))
        text_decoder = TextDecoder(cfg.text_decoder, pre_process=pre_process, post_process=post_process,
                                   pg_collection=pg_collection, vp_stage=vp_stage,
                                   config_overrides=text_config_overrides)
        super().__init__(config=text_decoder.config)
        self.cfg = cfg
        self.pre_process, self.post_process = pre_process, post_process
        self.dummy_encoder_forward = dummy_encoder_forward
        # how the encoders spread over ranks (mm_omni.parallel.hetero.HeteroEncoders: pg_collection(kind),
        # encode(kind, encoder, *inputs, dummy)); None = they follow the decoder's TP group
        self.encoder_parallel = encoder_parallel
        enc_pgs = {k: encoder_parallel.pg_collection(k) if encoder_parallel is not None else None
                   for k in ("vision", "audio")}
        self.image_encoder = self.audio_encoder = None
        # the encoders run where the decoder's input is made (the first pipeline stage); with
        # --hetero-parallel under decoder PP a split encoder has a copy on every stage's first chunk
        # that encodes a share of each step's media (mm_omni.parallel.encode_ahead); copies are left
        # out of this stage's checkpoint (the first stage saves the encoder)
        first_chunk = vp_stage in (None, 0)
        build = {k: pre_process or (first_chunk and encoder_parallel is not None
                                    and encoder_parallel.encodes_ahead(k)) for k in ("vision", "audio")}
        self.encoder_copies = [] if pre_process else [f"{key}." for k, key in
                                                       (("vision", "image_encoder"), ("audio", "audio_encoder"))
                                                       if build[k]]
        if build["vision"] and cfg.image_encoder is not None:
            from mm_omni.models.vision import VisionEncoder

            block = cfg.image_encoder
            # the projector's output is what lands in the decoder's embeddings; vision_encoder.llm_hidden_size is
            # descriptive only (MindSpeed-MM's Qwen2.5-VL model_3b.json states 1280 for a 2048-wide decoder)
            if block.vision_projector.hidden_size != cfg.text_decoder.hidden_size:
                raise ValueError(f"image_encoder.vision_projector.hidden_size={block.vision_projector.hidden_size} "
                                 f"must equal text_decoder.hidden_size={cfg.text_decoder.hidden_size}")
            self.image_encoder = VisionEncoder(block.vision_encoder, block.vision_projector,
                                               pg_collection=enc_pgs["vision"] or pg_collection)
            _freeze(self.image_encoder.encoder, block.vision_encoder.freeze)
            _freeze(self.image_encoder.projector, block.vision_projector.freeze)
        if build["audio"] and cfg.audio_encoder is not None:
            from mm_omni.models.audio import AudioEncoder

            audio_cfg = cfg.audio_encoder.audio_encoder
            if audio_cfg.output_dim != cfg.text_decoder.hidden_size:
                raise ValueError(f"audio_encoder.audio_encoder.output_dim={audio_cfg.output_dim} must equal "
                                 f"text_decoder.hidden_size={cfg.text_decoder.hidden_size}")
            self.audio_encoder = AudioEncoder(audio_cfg, pg_collection=enc_pgs["audio"] or pg_collection)
            _freeze(self.audio_encoder, audio_cfg.freeze)
        self.text_decoder = text_decoder
        _freeze(self.text_decoder, cfg.text_decoder.freeze)
        if self.encoder_copies:
            self._register_state_dict_hook(_drop_encoder_copies)
            self.register_load_state_dict_post_hook(_allow_missing_encoder_copies)

    def set_input_tensor(self, input_tensor) -> None:
        self.text_decoder.set_input_tensor(input_tensor)

    # megatron's finalize_model_grads asks the outermost module about tied embeddings (PP > 1)
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.text_decoder.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        return self.text_decoder.shared_embedding_or_output_weight()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.Tensor] = None,
        pixel_values_videos: Optional[torch.Tensor] = None,
        video_grid_thw: Optional[torch.Tensor] = None,
        input_features: Optional[torch.Tensor] = None,
        feature_attention_mask: Optional[torch.Tensor] = None,
        use_audio_in_video: Union[bool, torch.Tensor, None] = None,
        video_second_per_grid: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        return_logits: bool = False,
    ) -> DecoderOutput:
        """One thinker forward.

        ``input_ids`` / ``labels`` / ``attention_mask`` are ``[b, s]`` (or ``b = 1`` packed with
        ``cu_seqlens``); ``position_ids`` are the 3D M-RoPE positions ``[3, b, s]`` from
        :mod:`mm_omni.models.rope_index` (required when the batch holds media). Images
        (``pixel_values``, ``image_grid_thw``) and videos (``pixel_values_videos``, ``video_grid_thw``)
        go through the vision encoder in one call; audio clips come padded as ``input_features``
        ``[n_audio, mel, T]`` with ``feature_attention_mask`` ``[n_audio, T]``, in order of appearance
        (a video's own audio included). ``use_audio_in_video`` (per batch or per row) and
        ``video_second_per_grid`` change only the token layout and the positions, both already in
        ``input_ids`` / ``position_ids``: they are accepted so that a collated batch (and
        transformers' call signature) can be passed as it is. With ``cu_seqlens``, ``attention_mask``
        is ignored.
        """
        decoder_input = None
        if self.pre_process:
            has_media = any(x is not None for x in (pixel_values, pixel_values_videos, input_features))
            if has_media and position_ids is None:
                raise ValueError("position_ids are required when the batch holds images, videos or audio: "
                                 "build them with mm_omni.models.rope_index.get_rope_index (the collator does)")
            decoder_input = self.text_decoder.embed(input_ids)  # [s, b, h]
            image_feats, video_feats, vision_dummy = self._encode_vision(
                pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
            audio_feats, audio_dummy = self._encode_audio(input_features, feature_attention_mask)
            features = {token: feats for token, feats in ((self.cfg.image_token_id, image_feats),
                                                          (self.cfg.video_token_id, video_feats),
                                                          (self.cfg.audio_token_id, audio_feats)) if token is not None}
            decoder_input = scatter_features(decoder_input, input_ids, features)
            for dummy in (vision_dummy, audio_dummy):
                if dummy is not None:
                    decoder_input = decoder_input + 0.0 * dummy.sum().to(decoder_input.dtype)
        return self.text_decoder(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, labels=labels,
            decoder_input=decoder_input, cu_seqlens=cu_seqlens, return_logits=return_logits,
        )

    # -- encoders ---------------------------------------------------------------------------
    def _encode_vision(self, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw):
        """(image features, video features, dummy output): images and videos in ONE vision call; the
        dummy output only when the batch has neither and the dummy forward is on."""
        encoder = self.image_encoder
        inputs = vision_inputs(pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        if inputs is None:
            dummy = self._dummy_vision() if encoder is not None and self._needs_dummy("vision", encoder) else None
            return None, None, dummy
        if encoder is None:
            raise ValueError("the batch holds images/videos but model.json has no image_encoder")
        pixels, grids = inputs
        out = self._run_encoder("vision", encoder, pixels.to(_dtype(encoder)), grids)
        merge = self.cfg.image_encoder.vision_encoder.spatial_merge_size**2
        n_image = int(image_grid_thw.prod(-1).sum()) // merge if pixel_values is not None else 0
        images = out[:n_image] if pixel_values is not None else None
        videos = out[n_image:] if pixel_values_videos is not None else None
        return images, videos, None

    def _encode_audio(self, input_features, feature_attention_mask):
        """(audio features of all clips, dummy output), like :meth:`_encode_vision`."""
        encoder = self.audio_encoder
        inputs = audio_inputs(input_features, feature_attention_mask)
        if inputs is None:
            return None, (self._dummy_audio() if encoder is not None and self._needs_dummy("audio", encoder) else None)
        if encoder is None:
            raise ValueError("the batch holds audio but model.json has no audio_encoder")
        features, lens = inputs
        return self._run_encoder("audio", encoder, features.to(_dtype(encoder)), lens), None

    def _run_encoder(self, kind: str, encoder, *inputs) -> torch.Tensor:
        if self.encoder_parallel is None:
            return encoder(*inputs)
        dummy = getattr(self, f"_dummy_{kind}") if self._needs_dummy(kind, encoder) else None
        return self.encoder_parallel.encode(kind, encoder, *inputs, dummy=dummy)

    def _needs_dummy(self, kind: str, encoder: torch.nn.Module) -> bool:
        if self.encoder_parallel is not None and self.encoder_parallel.encodes_ahead(kind):
            return False  # encoded ahead of the schedule, which runs the dummy where a share is empty
        return self.dummy_encoder_forward and self.training and any(p.requires_grad for p in encoder.parameters())

    def _dummy_vision(self) -> torch.Tensor:
        """One image of a single merge block (spatial_merge_size^2 patches) of zeros."""
        vc = self.cfg.image_encoder.vision_encoder
        m = vc.spatial_merge_size
        width = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        weight = self.image_encoder.encoder.patch_embed.proj.weight
        pixels = torch.zeros(m * m, width, dtype=weight.dtype, device=weight.device)
        return self.image_encoder(pixels, torch.tensor([[1, m, m]]))

    def _dummy_audio(self) -> torch.Tensor:
        """One clip of 4 zero mel frames (one audio token)."""
        ac = self.cfg.audio_encoder.audio_encoder
        weight = self.audio_encoder.encoder.conv1.weight
        feats = torch.zeros(1, ac.num_mel_bins, 4, dtype=weight.dtype, device=weight.device)
        return self.audio_encoder(feats, torch.tensor([4], device=weight.device))


def vision_inputs(pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw):
    """``(pixels, grid_thw)`` of the images then the videos (one vision call), or None when there are none."""
    pixels, grids = [], []
    for px, grid, name in ((pixel_values, image_grid_thw, "image"), (pixel_values_videos, video_grid_thw, "video")):
        if px is not None:
            if grid is None:
                raise ValueError(f"{name} pixels given without {name}_grid_thw")
            pixels.append(px)
            grids.append(grid)
    return (torch.cat(pixels), torch.cat(grids)) if pixels else None


def audio_inputs(input_features, feature_attention_mask):
    """``(features, mel frames per clip)``, or None when there is no audio."""
    if input_features is None:
        return None
    if feature_attention_mask is None:
        lens = torch.full((input_features.shape[0],), input_features.shape[-1], dtype=torch.long)
    else:
        lens = feature_attention_mask.sum(-1)
    return input_features, lens


def _drop_encoder_copies(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k[len(prefix):].startswith(tuple(module.encoder_copies))]:
        del state_dict[key]


def _allow_missing_encoder_copies(module, incompatible_keys):
    # a later stage's encoder copies are not in its checkpoint: they are broadcast from the first stage
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not k.startswith(tuple(module.encoder_copies))]


def scatter_features(embeds: torch.Tensor, input_ids: torch.Tensor,
                     features: dict[int, Optional[torch.Tensor]]) -> torch.Tensor:
    """Put ``features[token_id]`` at the positions of ``token_id`` in ``embeds`` [s, b, h] (one index_put).

    Order: row-major over ``input_ids`` [b, s], as transformers' ``masked_scatter``. Every
    placeholder count must equal its feature count (0 when the modality has no features), else a
    ``ValueError`` names the token id and both counts.
    """
    rows, cols, values = [], [], []
    for token_id, feats in features.items():
        where = (input_ids == token_id).nonzero()  # [n, 2] (row, col), row-major
        n_feats = 0 if feats is None else feats.shape[0]
        if where.shape[0] != n_feats:
            raise ValueError(
                f"placeholder token {token_id} appears {where.shape[0]} times in input_ids but the encoder "
                f"produced {n_feats} features: the prompt's placeholder counts must match the media "
                "(image/video: t*h*w/merge^2 per item; audio: ((L-1)//2+1-2)//2+1 per clip of L mel frames)"
            )
        if n_feats:
            rows.append(where[:, 0])
            cols.append(where[:, 1])
            values.append(feats.to(embeds.dtype))
    if not values:
        return embeds
    b_idx, s_idx = torch.cat(rows).to(embeds.device), torch.cat(cols).to(embeds.device)
    return embeds.index_put((s_idx, b_idx), torch.cat(values))


def _dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype the module computes in (its parameters'; follows a later ``.to(bf16)`` / Float16Module)."""
    return next(module.parameters()).dtype


def _freeze(module: torch.nn.Module, freeze: bool) -> None:
    if freeze:
        for p in module.parameters():
            p.requires_grad_(False)
        logger.info("frozen: %s", type(module).__name__)
