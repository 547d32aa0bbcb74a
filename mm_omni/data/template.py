"""Chat templates: the base every family's template extends, and the label mask they share.

A family's template (``mm_omni/models/<family>/template.py``, registered by name in its ``family.py``)
says which transformers processor it runs, which special tokens and M-RoPE constants it reads, how a
media tag becomes its token block and how positions are computed. What is shared is the ChatML turn
format of the Qwen families::

    <|im_start|>system\n{system}<|im_end|>\n
    <|im_start|>user\n{content with media blocks}<|im_end|>\n
    <|im_start|>assistant\n{content}<|im_end|>\n

(identical to those models' chat templates, so the processor tokenises it the same way); the
processor then expands each placeholder to its exact token count. The system prompt defaults to
MindSpeed-MM's "You are a helpful assistant." (a template's ``default_system``; a template whose chat
template adds no system turn sets it to None).

Labels: each assistant turn's content and its closing ``<|im_end|>``. The ``\n`` after
``<|im_end|>`` stays in ``input_ids`` (the chat template has it) but is not a target: generation
stops at ``<|im_end|>``, so the model never has to produce it (MindSpeed-MM also trains on it;
dropping it changes nothing at inference). ``train_on_prompt`` labels everything but media
placeholders; ``mask_history`` keeps only the last assistant turn.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np
import torch

from mm_omni.data.formats import MEDIA_TAGS, Conversation
from mm_omni.data.processor import RopeParams, SpecialTokens

IGNORE_INDEX = -100
DEFAULT_SYSTEM = "You are a helpful assistant."
_TAG_RE = re.compile("|".join(re.escape(t) for t in MEDIA_TAGS.values()))


def media_order(conv: Conversation) -> list[tuple[str, int]]:
    """``(kind, index within kind)`` of every media tag in the order it appears in the text."""
    order, seen = [], {"image": 0, "video": 0, "audio": 0}
    tag_kind = {t: k for k, t in MEDIA_TAGS.items()}
    for role, content in conv.messages:
        for m in _TAG_RE.finditer(content):
            kind = tag_kind[m.group(0)]
            order.append((kind, seen[kind]))
            seen[kind] += 1
    return order


class ChatTemplate:
    """What the data pipeline needs from a family. Subclasses set ``name`` / ``media`` and implement the
    methods that raise ``NotImplementedError``; :meth:`render` is the shared ChatML format."""

    name: str = ""
    media: tuple[str, ...] = ()  # the media kinds ("image", "video", "audio") its rows may hold
    # the system turn of a row that has none (and no basic_parameters.default_system); None: no system turn
    default_system: Optional[str] = DEFAULT_SYSTEM

    def load_processor(self, model_name_or_path: str):
        """The family's transformers processor, from a local directory (nothing is downloaded)."""
        raise NotImplementedError

    def special_tokens(self, processor) -> SpecialTokens:
        raise NotImplementedError

    def model_token_ids(self, tokens: SpecialTokens) -> dict[str, int]:
        """The tokenizer's special ids under model.json's field names (what the model scatters at)."""
        raise NotImplementedError

    def rope_params(self, processor, model_name_or_path: Optional[str] = None) -> RopeParams:
        raise NotImplementedError

    def media_blocks(self, tokens: SpecialTokens) -> dict[str, str]:
        """Media kind -> the token text its tag becomes (the processor expands the placeholder inside)."""
        raise NotImplementedError

    def positions(self, ids: np.ndarray, out: dict, in_video: bool, tokens: SpecialTokens,
                  rope: RopeParams) -> torch.Tensor:
        """3D M-RoPE positions ``[3, s]`` of one processed row (``out``: the processor's tensors)."""
        raise NotImplementedError

    def turns(self, conv: Conversation, default_system: str | None = None) -> list[tuple[str, str]]:
        """The ``(role, content)`` turns :meth:`render` writes: the row's, after the default system turn if any."""
        messages = list(conv.messages)
        system = default_system or self.default_system
        if messages[0][0] != "system" and system:
            messages.insert(0, ("system", system))
        return messages

    def render(self, conv: Conversation, tokens: SpecialTokens, default_system: str | None = None) -> str:
        s = tokens.strings
        blocks = {MEDIA_TAGS[kind]: text for kind, text in self.media_blocks(tokens).items()}
        messages = self.turns(conv, default_system)
        parts = []
        for role, content in messages:
            content = _TAG_RE.sub(lambda m: blocks.get(m.group(0), m.group(0)), content)
            parts.append(f"{s['im_start']}{role}\n{content}{s['im_end']}\n")
        return "".join(parts)


def build_labels(
    input_ids: np.ndarray,
    roles: list[str],
    tokens: SpecialTokens,
    assistant_header: list[int],
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> np.ndarray:
    """Labels for rendered ``input_ids`` whose turns have ``roles`` (system first).

    Turns are found by ``<|im_start|>`` (a special token, so never merged with text);
    ``assistant_header`` is the tokenisation of ``"assistant\\n"``.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    starts = np.flatnonzero(ids == tokens.im_start)
    if len(starts) != len(roles):
        raise ValueError(f"found {len(starts)} <|im_start|> tokens for {len(roles)} turns "
                         "(does a message contain special-token text?)")
    media = np.isin(ids, tokens.placeholders())
    if train_on_prompt:
        labels = ids.copy()
        labels[media] = IGNORE_INDEX
        return labels
    labels = np.full_like(ids, IGNORE_INDEX)
    ends = list(starts[1:]) + [len(ids)]
    assistant_turns = [i for i, r in enumerate(roles) if r == "assistant"]
    if mask_history:
        assistant_turns = assistant_turns[-1:]
    hlen = len(assistant_header)
    for t in assistant_turns:
        s, e = int(starts[t]) + 1, int(ends[t])
        # Content starts after the header; if the content's first characters merged with the
        # header's "\n" into one token, that token is the first target.
        k = 0
        while k < hlen and s + k < e and ids[s + k] == assistant_header[k]:
            k += 1
        im_end = np.flatnonzero(ids[s:e] == tokens.im_end)
        stop = s + int(im_end[0]) + 1 if len(im_end) else e
        labels[s + k:stop] = ids[s + k:stop]
    return labels
