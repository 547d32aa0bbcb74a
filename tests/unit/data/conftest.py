"""Fixtures of the data tests: one tiny processor and a few media files per session."""

from __future__ import annotations

import pytest

from tests.fixtures.qwen2_5_omni import build_tiny_processor
from tests.fixtures.media import write_image, write_video, write_wav


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    write_image(d / "a.png", 56, 56, seed=0)
    write_image(d / "b.png", 84, 56, seed=1)  # a second size: 6 tokens
    write_wav(d / "a.wav", seconds=1.0)
    write_wav(d / "long.wav", seconds=3.0, sr=22050)  # resampled to 16 kHz
    write_video(d / "v.mp4", seconds=6.0, fps=2, with_audio=True)  # 3 interleave chunks
    write_video(d / "silent.mp4", seconds=2.0, fps=2, with_audio=False)
    (d / "broken.png").write_bytes(b"not a png")
    return d


@pytest.fixture(scope="session")
def processor_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_omni")
    build_tiny_processor(d)
    return d


@pytest.fixture(scope="session")
def processor(processor_dir):
    from mm_omni.models.qwen2_5_omni.template import TEMPLATE

    return TEMPLATE.load_processor(str(processor_dir))
