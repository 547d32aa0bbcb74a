"""One conversation -> training tensors: tokens, labels, 3D positions and media features.

This is what a data worker runs per row: decode media, render the template, run the processor
(exact placeholder counts and features), build labels, truncate to ``cutoff_len`` without ever
cutting a media span, and compute M-RoPE positions.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np
import torch

from mm_omni.config.data import DataConfig
from mm_omni.data.formats import BadSampleError, Conversation
from mm_omni.data.media import MediaError, has_audio_track, load_audio, load_audio_track, load_image, load_video
from mm_omni.data.processor import run_processor
from mm_omni.data.template import IGNORE_INDEX, ChatTemplate, build_labels, media_order

logger = logging.getLogger(__name__)


class TooLongError(ValueError):
    """The row does not fit ``cutoff_len`` without cutting a media span (or all its targets)."""


class RowEncoder:
    """Encodes :class:`Conversation` rows; picklable state is the config (processor reloads lazily)."""

    def __init__(self, cfg: DataConfig, cutoff_len: int, processor=None):
        self.cfg = cfg
        self.pp = cfg.dataset_param.preprocess_parameters
        self.bp = cfg.dataset_param.basic_parameters
        self.cutoff_len = cutoff_len
        self._processor = processor
        self._setup()

    def _setup(self) -> None:
        from mm_omni.registry import for_template

        self.template: ChatTemplate = for_template(self.bp.template).load("template")
        if self._processor is None:
            self._processor = self.template.load_processor(self.pp.model_name_or_path)
        self.tokens = self.template.special_tokens(self._processor)
        self.rope = self.template.rope_params(self._processor, self.pp.model_name_or_path)
        if self.pp.use_audio_in_video and "audio" not in self.template.media:
            raise ValueError(f"preprocess_parameters.use_audio_in_video=true but template {self.template.name!r} reads "
                             "no audio: set it to false")
        self.assistant_header = self._processor.tokenizer("assistant\n", add_special_tokens=False)["input_ids"]

    def __getstate__(self):  # processors are rebuilt in worker processes, not pickled
        return {"cfg": self.cfg, "cutoff_len": self.cutoff_len}

    def __setstate__(self, state):
        self.__init__(state["cfg"], state["cutoff_len"])

    @property
    def processor(self):
        return self._processor

    def _load_media(self, conv: Conversation):
        def guard(fn, path, *args):
            try:
                return fn(path, *args)
            except MediaError as exc:
                raise BadSampleError(conv.dataset, conv.index, f"unreadable media: {exc}", path) from None

        images = [guard(load_image, p) for p in conv.images]
        videos = [guard(load_video, p, self.pp.video_fps, self.pp.video_maxlen) for p in conv.videos]
        audios = [guard(load_audio, p, self.pp.audio_sampling_rate) for p in conv.audios]
        tracks: list[Optional[np.ndarray]] = []
        if self.pp.use_audio_in_video and videos:
            with_audio = [guard(has_audio_track, p) for p in conv.videos]
            if any(with_audio) and not all(with_audio):
                silent = [p for p, a in zip(conv.videos, with_audio) if not a]
                raise BadSampleError(conv.dataset, conv.index,
                                     "use_audio_in_video: some videos of the row have no audio track", silent[0])
            if all(with_audio):
                tracks = [guard(load_audio_track, p, self.pp.audio_sampling_rate) for p in conv.videos]
        return images, videos, audios, tracks

    def encode(self, conv: Conversation) -> dict[str, Any]:
        unread = [kind for kind, paths in (("image", conv.images), ("video", conv.videos), ("audio", conv.audios))
                  if paths and kind not in self.template.media]
        if unread:
            raise BadSampleError(conv.dataset, conv.index, f"template {self.template.name!r} reads no "
                                 f"{' or '.join(unread)} (it takes {', '.join(self.template.media)})")
        images, videos, audios, tracks = self._load_media(conv)
        in_video = bool(tracks)
        slots, slot_src = [], []  # audio slots in text order
        for kind, k in media_order(conv):
            if kind == "audio":
                slots.append(audios[k])
                slot_src.append(None)
            elif kind == "video" and in_video:
                slots.append(tracks[k])
                slot_src.append(k)
        text = self.template.render(conv, self.tokens, self.bp.default_system)
        try:
            out = run_processor(self._processor, text, self.pp, images, videos, slots, slot_src)
        except ValueError as exc:  # e.g. an image smaller than one patch, mismatched video rates
            paths = ", ".join(conv.images + conv.videos + conv.audios)
            raise BadSampleError(conv.dataset, conv.index, f"processor rejected the row: {exc}", paths) from None
        ids = out["input_ids"].numpy()
        roles = [r for r, _ in self.template.turns(conv, self.bp.default_system)]
        labels = build_labels(ids, roles, self.tokens, self.assistant_header,
                              self.bp.train_on_prompt, self.bp.mask_history)
        mel_lens = out["feature_attention_mask"].sum(-1) if "feature_attention_mask" in out else None
        try:
            positions = self._positions(ids, out, in_video)
        except ValueError as exc:  # a placeholder token in the text with no media behind it
            paths = ", ".join(conv.images + conv.videos + conv.audios) or None
            raise BadSampleError(conv.dataset, conv.index, str(exc), paths) from None
        n = self._fit_length(conv, ids, labels)
        row: dict[str, Any] = {
            "input_ids": torch.from_numpy(ids[:n].copy()),
            "labels": torch.from_numpy(labels[:n].copy()),
            "position_ids": positions[:, :n].contiguous(),
            "use_audio_in_video": in_video,
        }
        for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                    "video_second_per_grid"):
            if key in out:
                row[key] = out[key]
        if mel_lens is not None:
            # Keep only the valid mel frames of this row's longest audio (the processor pads to 30 s).
            longest = int(mel_lens.max())
            row["input_features"] = out["input_features"][:, :, :longest].contiguous()
            row["feature_attention_mask"] = out["feature_attention_mask"][:, :longest].contiguous()
        return row

    def _positions(self, ids: np.ndarray, out: dict, in_video: bool) -> torch.Tensor:
        return self.template.positions(ids, out, in_video, self.tokens, self.rope)

    def _fit_length(self, conv: Conversation, ids: np.ndarray, labels: np.ndarray) -> int:
        """Length to keep: all of it, or a text-only tail cut; raises :class:`TooLongError`."""
        n, cutoff = len(ids), self.cutoff_len
        if n <= cutoff:
            return n
        media_marks = np.isin(ids, self.tokens.media_marks())
        last_media = int(np.flatnonzero(media_marks)[-1]) if media_marks.any() else -1
        if last_media >= cutoff:
            raise TooLongError(f"dataset {conv.dataset!r} row {conv.index}: {n} tokens > cutoff_len {cutoff} "
                               "and the cut would split a media span")
        if not (labels[:cutoff] != IGNORE_INDEX).any():
            raise TooLongError(f"dataset {conv.dataset!r} row {conv.index}: {n} tokens > cutoff_len {cutoff} "
                               "and no target token is left before the cut")
        return cutoff
