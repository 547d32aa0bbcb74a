"""Qwen3-Omni's thinker: the omni model (:class:`~mm_omni.models.omni.OmniModel`) with the Qwen3 stacks.

The image encoder is the Qwen3-VL-style vision stack, whose output carries its deepstack features next to
the merged ones; the omni model scatters them as the decoder's layer additions (added after decoder layers
0, 1, 2 at the visual positions, as transformers' ``_deepstack_process``); the audio encoder is AuT; the
decoder is the shared text decoder in its Qwen3-MoE form (model.json says so).
"""

from __future__ import annotations

import torch

from mm_omni.models.omni import OmniModel, _freeze


class Qwen3OmniModel(OmniModel):
    def build_image_encoder(self, block, pg_collection) -> torch.nn.Module:
        from mm_omni.models.vision_qwen3 import Qwen3VisionEncoder

        encoder = Qwen3VisionEncoder(block.vision_encoder, block.vision_projector, pg_collection=pg_collection)
        _freeze(encoder.encoder, block.vision_encoder.freeze)
        # the deepstack mergers are projectors too: they follow vision_projector.freeze
        _freeze(encoder.projector, block.vision_projector.freeze)
        _freeze(encoder.deepstack_projectors, block.vision_projector.freeze)
        return encoder

    def build_audio_encoder(self, block, pg_collection) -> torch.nn.Module:
        from mm_omni.models.audio_aut import AuTEncoder

        encoder = AuTEncoder(block.audio_encoder, pg_collection=pg_collection)
        _freeze(encoder, block.audio_encoder.freeze)
        return encoder
