"""Qwen2.5-Omni thinker: its Hugging Face names around the shared stack tables.

HF names come in two spellings, both accepted, each with or without the ``thinker.`` prefix of a full
Qwen2.5-Omni checkpoint:

* "hub" (what ``save_pretrained`` writes and the Hub's 7B holds; the tables' canonical spelling):
  ``model.layers.N...``, ``model.embed_tokens``, ``model.norm``, ``lm_head``, ``visual.*``, ``audio_tower.*``;
* "module" (``state_dict()`` of transformers >= 5): ``model.language_model.*``, ``model.visual.*``,
  ``model.audio_tower.*``, ``lm_head``.

``talker.*`` / ``token2wav.*`` are not the thinker's: never converted, carried over from the HF files.
"""

from __future__ import annotations

from mm_omni.checkpoint.mapping import HfNames, Map
from mm_omni.models.audio import hf_mapping as audio
from mm_omni.models.qwen2_5_omni.hf_config import thinker_of
from mm_omni.models.text import hf_mapping as text
from mm_omni.models.vision import hf_mapping as vision

NAMES = HfNames(prefix="thinker.",
                spellings=(("model.language_model.", "model."), ("model.visual.", "visual."),
                           ("model.audio_tower.", "audio_tower.")),
                other_models=("talker.", "token2wav."))

# in checkpoint order of the pipeline: the encoders, then the decoder they feed
MODULES = (vision.module_spec(lambda t: t.vision_config), audio.module_spec(lambda t: t.audio_config),
           text.module_spec(lambda t: t.text_config))
DERIVED = audio.derived() + vision.derived() + text.derived()


def is_tied(thinker) -> bool:
    """transformers ties the thinker's lm_head by the *thinker* config's flag (7B: False)."""
    return bool(getattr(thinker_of(thinker), "tie_word_embeddings", False))


TIE = text.tie(is_tied)


def table(thinker) -> tuple[Map, ...]:
    """Every tensor of the thinker: text, vision (q/k/v apart), audio."""
    return text.table(is_tied(thinker)) + vision.table(qkv="separate") + audio.table()
