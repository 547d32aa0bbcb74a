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

import functools
import logging
from typing import Collection, Mapping, Optional, Union

import torch
from megatron.core.transformer.module import MegatronModule

from mm_omni.config.model import OmniModelConfig
from mm_omni.models.common.encoder_api import dummy_forward
from mm_omni.models.text import DecoderOutput, TextDecoder
from mm_omni.platform import get_platform

logger = logging.getLogger(__name__)


class OmniModel(MegatronModule):
    """The thinker: ``forward`` returns the decoder's :class:`DecoderOutput` (loss, per-token loss, logits)."""

    # the encoder blocks, by model.json key (= attribute name), in the order they run
    ENCODERS = ("image_encoder", "audio_encoder")
    # what forward takes from a collated batch, and which of those it reads on the host (index bookkeeping
    # of the encoders, the decoder's padding check: a device tensor there costs a sync)
    INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "labels", "pixel_values", "image_grid_thw",
                  "pixel_values_videos", "video_grid_thw", "input_features", "feature_attention_mask",
                  "use_audio_in_video", "video_second_per_grid", "cu_seqlens")
    HOST_KEYS = ("image_grid_thw", "video_grid_thw", "feature_attention_mask", "attention_mask")

    def __init__(
        self,
        cfg: OmniModelConfig,
        pre_process: bool = True,
        post_process: bool = True,
        pg_collection=None,
        vp_stage: Optional[int] = None,
        dummy_encoder_forward: bool = True,
        text_config_overrides: Optional[dict] = None,
        encoders: Optional[Collection[str]] = None,
        encoder_pg_collections: Optional[dict] = None,
    ):
        """``encoders``: the encoder blocks (of :attr:`ENCODERS`) this module builds, where model.json has
        them; default: all of them on the first pipeline stage (where the decoder's input is made), none
        elsewhere. ``encoder_pg_collections``: process groups per encoder (default: ``pg_collection``)."""
        get_platform()
        # the scatter positions of the encoders model.json has
        cfg.require_token_ids(*(["image_token_id", "video_token_id"] if cfg.image_encoder is not None else [])
                              + (["audio_token_id"] if cfg.audio_encoder is not None else []))
        build = set(self.ENCODERS if pre_process else ()) if encoders is None else set(encoders)
        if build - set(self.ENCODERS):
            raise ValueError(f"encoders={sorted(build)}: OmniModel's encoders are {', '.join(self.ENCODERS)}")
        enc_pgs = encoder_pg_collections or {}
        text_decoder = TextDecoder(cfg.text_decoder, pre_process=pre_process, post_process=post_process,
                                   pg_collection=pg_collection, vp_stage=vp_stage,
                                   config_overrides=text_config_overrides)
        super().__init__(config=text_decoder.config)
        self.cfg = cfg
        self.pre_process, self.post_process = pre_process, post_process
        self.dummy_encoder_forward = dummy_encoder_forward
        # how the encoders' calls run: None = directly; parallel code may set an object with
        # encode(name, encoder, data, sizes, dummy=...) and owns_dummy(name) (mm_omni.parallel.hetero)
        self.encoder_runner = None
        self.image_encoder = self.audio_encoder = None
        if "image_encoder" in build and cfg.image_encoder is not None:
            block = cfg.image_encoder
            # the projector's output is what lands in the decoder's embeddings; vision_encoder.llm_hidden_size is
            # descriptive only (MindSpeed-MM's Qwen2.5-VL model_3b.json states 1280 for a 2048-wide decoder)
            if block.vision_projector.hidden_size != cfg.text_decoder.hidden_size:
                raise ValueError(f"image_encoder.vision_projector.hidden_size={block.vision_projector.hidden_size} "
                                 f"must equal text_decoder.hidden_size={cfg.text_decoder.hidden_size}")
            self.image_encoder = self.build_image_encoder(block, enc_pgs.get("image_encoder") or pg_collection)
        if "audio_encoder" in build and cfg.audio_encoder is not None:
            audio_cfg = cfg.audio_encoder.audio_encoder
            if audio_cfg.output_dim != cfg.text_decoder.hidden_size:
                raise ValueError(f"audio_encoder.audio_encoder.output_dim={audio_cfg.output_dim} must equal "
                                 f"text_decoder.hidden_size={cfg.text_decoder.hidden_size}")
            self.audio_encoder = self.build_audio_encoder(cfg.audio_encoder, enc_pgs.get("audio_encoder") or pg_collection)
        self.text_decoder = text_decoder
        _freeze(self.text_decoder, cfg.text_decoder.freeze)

    # -- the encoder stacks: a family with other stacks overrides these ----------------------------------
    def build_image_encoder(self, block, pg_collection) -> torch.nn.Module:
        """The ``image_encoder`` of model.json's block, frozen as its stacks say."""
        from mm_omni.models.vision import VisionEncoder

        encoder = VisionEncoder(block.vision_encoder, block.vision_projector, pg_collection=pg_collection)
        _freeze(encoder.encoder, block.vision_encoder.freeze)
        _freeze(encoder.projector, block.vision_projector.freeze)
        return encoder

    def build_audio_encoder(self, block, pg_collection) -> torch.nn.Module:
        from mm_omni.models.audio import AudioEncoder

        encoder = AudioEncoder(block.audio_encoder, pg_collection=pg_collection)
        _freeze(encoder, block.audio_encoder.freeze)
        return encoder

    def set_input_tensor(self, input_tensor) -> None:
        self.text_decoder.set_input_tensor(input_tensor)

    # megatron's finalize_model_grads asks the outermost module about tied embeddings (PP > 1)
    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.text_decoder.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        return self.text_decoder.shared_embedding_or_output_weight()

    def encoders(self) -> dict[str, torch.nn.Module]:
        """The encoders this module holds, by name (each an :class:`~mm_omni.models.common.encoder_api.ItemEncoder`)."""
        return {name: getattr(self, name) for name in self.ENCODERS if getattr(self, name) is not None}

    @staticmethod
    def encoder_inputs(batch: Mapping) -> dict[str, Optional[tuple[torch.Tensor, torch.Tensor]]]:
        """Each encoder's ``(data, sizes)`` in a collated batch (None: no such media), as forward feeds them."""
        return {"image_encoder": vision_inputs(batch.get("pixel_values"), batch.get("image_grid_thw"),
                                               batch.get("pixel_values_videos"), batch.get("video_grid_thw")),
                "audio_encoder": audio_inputs(batch.get("input_features"), batch.get("feature_attention_mask"))}

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
        layout=None,
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
        is ignored. ``layout``: the decoder's token layout (:meth:`TextDecoder.forward`).
        """
        decoder_input = None
        if self.pre_process:
            has_media = any(x is not None for x in (pixel_values, pixel_values_videos, input_features))
            if has_media and position_ids is None:
                raise ValueError("position_ids are required when the batch holds images, videos or audio: "
                                 "build them with mm_omni.models.rope_index.get_rope_index (the collator does)")
            decoder_input = self.text_decoder.embed(input_ids)  # [s, b, h]
            # images and videos in ONE vision call
            vision, vision_dummy = self._encode(
                "image_encoder", vision_inputs(pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw))
            image_feats = video_feats = None
            if vision is not None:
                merge = self.cfg.image_encoder.vision_encoder.spatial_merge_size**2
                n_image = int(image_grid_thw.prod(-1).sum()) // merge if pixel_values is not None else 0
                image_feats = vision[:n_image] if pixel_values is not None else None
                video_feats = vision[n_image:] if pixel_values_videos is not None else None
            audio_feats, audio_dummy = self._encode("audio_encoder", audio_inputs(input_features, feature_attention_mask))
            features = {token: feats for token, feats in ((self.cfg.image_token_id, image_feats),
                                                          (self.cfg.video_token_id, video_feats),
                                                          (self.cfg.audio_token_id, audio_feats)) if token is not None}
            decoder_input, layer_additions = merge_features(decoder_input, input_ids, features)
            for dummy in (vision_dummy, audio_dummy):
                if dummy is not None:
                    decoder_input = decoder_input + 0.0 * dummy.sum().to(decoder_input.dtype)
        else:
            layer_additions = None
        return self.text_decoder(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, labels=labels,
            decoder_input=decoder_input, cu_seqlens=cu_seqlens, return_logits=return_logits, layout=layout,
            layer_additions=layer_additions,
        )

    # -- encoders ---------------------------------------------------------------------------
    def _encode(self, name: str, inputs):
        """(features of every item, dummy output): the dummy output only when the batch has no such media
        and the dummy forward is on."""
        encoder = getattr(self, name)
        if inputs is None:
            return None, (dummy_forward(encoder) if encoder is not None and self._needs_dummy(name, encoder) else None)
        if encoder is None:
            raise ValueError(f"the batch holds {_MEDIA[name]} but model.json has no {name}")
        data, sizes = inputs
        return self._run_encoder(name, encoder, data.to(_dtype(encoder)), sizes), None

    def _run_encoder(self, name: str, encoder, data: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        if self.encoder_runner is None:
            return encoder(data, sizes)
        dummy = functools.partial(dummy_forward, encoder) if self._needs_dummy(name, encoder) else None
        return self.encoder_runner.encode(name, encoder, data, sizes, dummy=dummy)

    def _needs_dummy(self, name: str, encoder: torch.nn.Module) -> bool:
        if self.encoder_runner is not None and self.encoder_runner.owns_dummy(name):
            return False  # e.g. encoded ahead of the pipeline schedule, which runs the dummy where a share is empty
        return self.dummy_encoder_forward and self.training and any(p.requires_grad for p in encoder.parameters())


# what each encoder reads, for messages
_MEDIA = {"image_encoder": "images/videos", "audio_encoder": "audio"}


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


def merge_features(embeds: torch.Tensor, input_ids: torch.Tensor,
                   features: dict[int, Optional[torch.Tensor]]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(embeds with the features scattered in, layer additions or None)``.

    An encoder may return features wider than the decoder's hidden size h, ``[n, h + k * h]``: the first h
    columns replace the placeholder embeddings, the other k blocks are scattered at the same positions into
    zeros ``[s, b, k * h]``, the decoder's ``layer_additions`` (block i is added after decoder layer i:
    Qwen3-VL's deepstack features). Features of width h add nothing. Several encoders with additions must
    agree on k."""
    h = embeds.shape[-1]
    widths = {f.shape[-1] for f in features.values() if f is not None and f.shape[-1] != h}
    if len(widths) > 1:
        raise ValueError(f"encoder features of widths {sorted(widths)} for a decoder of hidden size {h}: the "
                         "encoders' layer additions must have the same number of blocks")
    merged = scatter_features(embeds, input_ids, {t: None if f is None else f[:, :h] for t, f in features.items()})
    if not widths:
        return merged, None
    extra = {t: f[:, h:] for t, f in features.items() if f is not None and f.shape[-1] != h}
    zeros = embeds.new_zeros(embeds.shape[0], embeds.shape[1], widths.pop() - h)
    return merged, scatter_features(zeros, input_ids, extra)


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
