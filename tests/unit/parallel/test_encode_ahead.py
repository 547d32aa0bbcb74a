"""``EncodeAhead`` (hetero encoders under decoder PP) on one process: a step's media encoded ahead give every
micro-batch the features its encoders would give it, in order, and the deferred backward gives the encoder
parameters the gradients of direct autograd — with a micro-batch without media, one without audio, and
padded audio of different lengths per micro-batch (fp32, 1e-6)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_thinker_config
from tests.helpers import init_megatron

PATCH = 3 * 2 * 14 * 14


def _batches(gen):
    def audio(lens):
        feats = torch.randn(len(lens), 128, max(lens), generator=gen)
        mask = (torch.arange(max(lens))[None] < torch.tensor(lens)[:, None]).long()
        return dict(input_features=feats, feature_attention_mask=mask)

    def images(grids):
        return dict(pixel_values=torch.randn(sum(t * h * w for t, h, w in grids), PATCH, generator=gen),
                    image_grid_thw=torch.tensor(grids))

    return [dict(**images([[1, 4, 8], [1, 4, 4]]), **audio([40, 17])),  # images + two clips
            {},  # text only
            dict(**images([[1, 8, 4]]), pixel_values_videos=torch.randn(2 * 16, PATCH, generator=gen),
                 video_grid_thw=torch.tensor([[2, 4, 4]])),  # an image and a video, no audio
            audio([33])]  # one clip, padded shorter than the first micro-batch's


@pytest.fixture(scope="module")
def model():
    from mm_omni.models.qwen2_5_omni.hf_config import from_hf_thinker_config
    from mm_omni.models.omni import OmniModel

    init_megatron()
    torch.manual_seed(0)
    return OmniModel(from_hf_thinker_config(tiny_thinker_config()), dummy_encoder_forward=False).train()


def _direct(model, batch, kind):
    from mm_omni.models.omni import audio_inputs, vision_inputs

    if kind == "vision":
        got = vision_inputs(batch.get("pixel_values"), batch.get("image_grid_thw"),
                            batch.get("pixel_values_videos"), batch.get("video_grid_thw"))
        return None if got is None else (got, model.image_encoder(*got))
    got = audio_inputs(batch.get("input_features"), batch.get("feature_attention_mask"))
    return None if got is None else (got, model.audio_encoder(*got))


def test_encode_ahead_matches_direct_encoding(model):
    import torch.distributed as dist

    from mm_omni.parallel.encode_ahead import EncodeAhead
    from mm_omni.parallel.encoder_split import EncoderDataParallel

    batches = _batches(torch.Generator().manual_seed(1))
    hidden = model.cfg.text_decoder.hidden_size
    ahead = EncodeAhead(EncoderDataParallel(dist.group.WORLD, hidden), ("image_encoder", "audio_encoder"))
    weights = torch.Generator().manual_seed(2)

    def loss_of(features):  # a fixed random linear function of every feature row
        return sum((f * torch.randn(f.shape, generator=weights)).sum() for f in features)

    model.zero_grad(set_to_none=True)
    ahead.run(model, batches, torch.device("cpu"), training=True)
    got, want = [], []
    for batch in batches:
        for kind in ("vision", "audio"):
            direct = _direct(model, batch, kind)
            if direct is None:
                continue
            inputs, features = direct
            got.append(ahead.encode({"vision": "image_encoder", "audio": "audio_encoder"}[kind], *inputs))
            want.append(features)
            torch.testing.assert_close(got[-1], features, rtol=1e-6, atol=1e-6)
    assert len(got) == 4  # 2 micro-batches with vision, 2 with audio

    loss_of(got).backward()  # the decoder's backward: leaves the features' gradient in the leaves
    ahead.backward()  # the deferred encoder backward (after the schedule)
    ahead_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad(set_to_none=True)
    weights.manual_seed(2)
    loss_of(want).backward()
    direct_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert direct_grads.keys() == ahead_grads.keys() and any(n.startswith("audio_encoder") for n in direct_grads)
    for name, grad in direct_grads.items():
        torch.testing.assert_close(ahead_grads[name], grad, rtol=1e-6, atol=1e-6, msg=name)


def test_a_step_without_audio_still_gives_every_audio_parameter_a_gradient(model):
    """No clip in the whole step: a dummy forward with a zero gradient (DDP's buckets wait for every parameter)."""
    import torch.distributed as dist

    from mm_omni.parallel.encode_ahead import EncodeAhead
    from mm_omni.parallel.encoder_split import EncoderDataParallel

    batches = [b for b in _batches(torch.Generator().manual_seed(1)) if "input_features" not in b]
    ahead = EncodeAhead(EncoderDataParallel(dist.group.WORLD, model.cfg.text_decoder.hidden_size),
                        ("image_encoder", "audio_encoder"))
    model.zero_grad(set_to_none=True)
    ahead.run(model, batches, torch.device("cpu"), training=True)
    ahead.backward()
    audio = {n: p for n, p in model.audio_encoder.named_parameters() if p.requires_grad}
    bad = {n: None if p.grad is None else float(p.grad.abs().max()) for n, p in audio.items() if p.grad is None or p.grad.any()}
    assert not bad, bad  # every audio parameter: a gradient, zero
    with pytest.raises(RuntimeError, match="no audio_encoder features encoded ahead"):
        ahead.encode("audio_encoder", torch.zeros(1, 128, 4), torch.tensor([4]))
