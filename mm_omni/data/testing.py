"""Tiny, fully local Qwen2.5-Omni processor and media files for tests and the CPU demo.

Nothing is downloaded. :func:`build_tiny_processor` writes a ``Qwen2_5OmniProcessor`` directory
(tokenizer + image/video processor + Whisper feature extractor + chat template) whose tokenizer has a
byte-level BPE vocabulary of 1000 regular tokens and the Qwen2.5-Omni special tokens right after it.
The multimodal ids match ``tests/conftest.py::TINY_TOKEN_IDS`` so a tiny thinker model and this
processor agree:

====================  ====  ====================  ====
``<|IMAGE|>``         1000  ``<|audio_bos|>``     1005
``<|VIDEO|>``         1001  ``<|audio_eos|>``     1006
``<|AUDIO|>``         1002  ``<|endoftext|>``     1007
``<|vision_bos|>``    1003  ``<|im_start|>``      1008
``<|vision_eos|>``    1004  ``<|im_end|>``        1009
                            ``<|vision_pad|>``    1010
====================  ====  ====================  ====

Total vocabulary 1011 (fits a model ``vocab_size`` of 1024).
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np

TINY_VOCAB_SIZE = 1000
IMAGE_PIXELS = 56 * 56  # pixel caps of tiny_data_config: 4 merged tokens per 56x56 image
VIDEO_PIXELS = 56 * 56
MIN_PIXELS = 28 * 28
TINY_SPECIAL_TOKENS = {
    "<|IMAGE|>": 1000, "<|VIDEO|>": 1001, "<|AUDIO|>": 1002, "<|vision_bos|>": 1003,
    "<|vision_eos|>": 1004, "<|audio_bos|>": 1005, "<|audio_eos|>": 1006, "<|endoftext|>": 1007,
    "<|im_start|>": 1008, "<|im_end|>": 1009, "<|vision_pad|>": 1010,
}
# The same tokens at the ids of the released Qwen2.5-Omni tokenizer (below them: unreachable filler entries), for
# tests that run MindSpeed-MM's model.json files, which state some of these ids.
QWEN_OMNI_SPECIAL_TOKENS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|AUDIO|>": 151646,
    "<|audio_bos|>": 151647, "<|audio_eos|>": 151648, "<|vision_bos|>": 151652, "<|vision_eos|>": 151653,
    "<|vision_pad|>": 151654, "<|IMAGE|>": 151655, "<|VIDEO|>": 151656,
}
# Named tokens the Omni processor reads from the tokenizer (tokenizer.image_token, ...).
_NAMED = {
    "image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "audio_token": "<|AUDIO|>",
    "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
}

# Same structure as the official Qwen2.5-Omni chat template (system default, media blocks).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = (
    "You are a helpful assistant. What is in this image? Describe the video and the audio. "
    "The speaker said hello. A cat is playing with a ball. What is she doing? Compare these two "
    "pictures. system user assistant. 0123456789 The quick brown fox jumps over the lazy dog.\n"
)


def _tiny_bpe(size: int = TINY_VOCAB_SIZE) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE with Qwen2's pre-tokenizer; pad the vocab to exactly ``size`` ids."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([_CORPUS] * 20, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # Unreachable filler entries (no merge produces them) keep the special ids fixed at 1000+.
    k = 0
    while len(vocab) < size:
        vocab[f"<|filler_{k}|>"] = len(vocab)
        k += 1
    return vocab, merges


def build_tiny_processor(out_dir: str | Path, image_max_pixels: int = 112 * 112,
                         special_tokens: dict[str, int] = TINY_SPECIAL_TOKENS):
    """Write a tiny ``Qwen2_5OmniProcessor`` into ``out_dir`` and return it (loaded back from disk).

    ``special_tokens`` (token -> id) places the special tokens; the regular vocabulary fills the ids below.
    """
    from transformers import (
        Qwen2_5OmniProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor, WhisperFeatureExtractor,
    )
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = _tiny_bpe(min(special_tokens.values()))
    vocab.update(special_tokens)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens=dict(_NAMED), model_max_length=32768,
    )
    tokenizer.add_tokens([t for t in special_tokens if t not in _NAMED.values()], special_tokens=True)
    size = {"shortest_edge": 28 * 28, "longest_edge": image_max_pixels}
    processor = Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        video_processor=Qwen2VLVideoProcessor(size=size),
        feature_extractor=WhisperFeatureExtractor(feature_size=128),
        tokenizer=tokenizer,
        chat_template=TINY_CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(out_dir))
    loaded = Qwen2_5OmniProcessor.from_pretrained(str(out_dir))
    for token, idx in special_tokens.items():
        got = loaded.tokenizer.convert_tokens_to_ids(token)
        if got != idx:
            raise RuntimeError(f"tiny tokenizer: {token} got id {got}, expected {idx}")
    return loaded


def write_image(path: str | Path, width: int = 56, height: int = 56, seed: int = 0) -> Path:
    """A random RGB PNG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return Path(path)


def write_wav(path: str | Path, seconds: float = 1.0, sr: int = 16000, freq: float = 440.0) -> Path:
    """A sine tone WAV (mono float)."""
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    sf.write(str(path), (0.3 * np.sin(2 * math.pi * freq * t)).astype(np.float32), sr)
    return Path(path)


def write_video(path: str | Path, seconds: float = 2.0, fps: int = 4, size: int = 56,
                with_audio: bool = True, sr: int = 16000) -> Path:
    """An MP4 (mpeg4 video, AAC audio when ``with_audio``) encoded with PyAV."""
    import av

    rng = np.random.default_rng(1)
    n_frames = int(seconds * fps)
    with av.open(str(path), mode="w") as container:
        vstream = container.add_stream("mpeg4", rate=fps)
        vstream.width = vstream.height = size
        vstream.pix_fmt = "yuv420p"
        astream = container.add_stream("aac", rate=sr, layout="mono") if with_audio else None
        for i in range(n_frames):
            img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for packet in vstream.encode(frame):
                container.mux(packet)
        for packet in vstream.encode():
            container.mux(packet)
        if astream is not None:
            n = int(seconds * sr)
            wave = (0.3 * np.sin(2 * math.pi * 330.0 * np.arange(n) / sr)).astype(np.float32)
            chunk = 1024
            for start in range(0, n, chunk):
                part = wave[start:start + chunk][None, :]
                frame = av.AudioFrame.from_ndarray(part, format="flt", layout="mono")
                frame.sample_rate = sr
                frame.pts = start
                for packet in astream.encode(frame):
                    container.mux(packet)
            for packet in astream.encode():
                container.mux(packet)
    return Path(path)


def tiny_data_config(processor_dir, media_dir, dataset: str, **basic) -> dict:
    """A data.json dict for the tiny processor (56x56 pixel caps); ``basic`` overrides basic_parameters."""
    use_aiv = basic.pop("use_audio_in_video", False)
    dataloader = basic.pop("dataloader", {})
    return {
        "dataset_param": {
            "dataset_type": "huggingface",
            "preprocess_parameters": {
                "model_name_or_path": str(processor_dir), "image_max_pixels": IMAGE_PIXELS,
                "image_min_pixels": MIN_PIXELS, "video_max_pixels": VIDEO_PIXELS, "video_min_pixels": MIN_PIXELS,
                "video_fps": 2.0, "video_maxlen": 128, "use_audio_in_video": use_aiv,
            },
            "basic_parameters": {"template": "qwen2_omni", "dataset_dir": str(media_dir), "dataset": dataset, **basic},
            "attr": {"messages": "messages", "role_tag": "role", "content_tag": "content",
                     "user_tag": "user", "assistant_tag": "assistant"},
        },
        "dataloader_param": {"shuffle": False, **dataloader},
    }


def write_dataset(path, rows, jsonl: bool = False):
    with open(path, "w", encoding="utf-8") as f:
        if jsonl:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")
        else:
            json.dump(rows, f)
    return str(path)


def hf_rope_index(tokens, rope, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
                  second_per_grids=None, audio_seqlens=None, use_audio_in_video=False):
    """transformers' Qwen2.5-Omni ``get_rope_index`` called without building a model."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
        Qwen2_5OmniPreTrainedModelForConditionalGeneration as M,
    )

    cfg = SimpleNamespace(
        image_token_id=tokens.image, video_token_id=tokens.video, audio_token_id=tokens.audio,
        vision_start_token_id=tokens.vision_bos, audio_start_token_id=tokens.audio_bos,
        position_id_per_seconds=int(rope.position_id_per_seconds), seconds_per_chunk=rope.seconds_per_chunk,
    )
    fake = SimpleNamespace(spatial_merge_size=rope.spatial_merge_size, config=cfg)
    fake.get_llm_pos_ids_for_vision = partial(M.get_llm_pos_ids_for_vision, fake)
    fake.get_chunked_index = partial(M.get_chunked_index, fake)
    if attention_mask is None:
        import torch

        attention_mask = torch.ones_like(input_ids)
    pos, _ = M.get_rope_index(fake, input_ids, image_grid_thw, video_grid_thw, attention_mask,
                              use_audio_in_video, audio_seqlens, second_per_grids)
    return pos
