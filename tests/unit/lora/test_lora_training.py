"""LoRA through ``mm_omni.train`` (1 process, stand-in GPT): base frozen bit for bit, adapters train,
checkpoints carry them (resume reproduces the run), a base checkpoint loads into a LoRA model."""

from __future__ import annotations

import pytest
import torch

from mm_omni.train import main
from tests.distributed.standin_task import standin_task
from tests.distributed.torchrun import free_port

FLAGS = ["--lr", "1e-2", "--train-iters", "3", "--global-batch-size", "2", "--log-interval", "1",
         "--lr-decay-style", "constant", "--lora-target-modules", "linear_qkv", "linear_proj", "linear_fc1",
         "decoder.layers.1.mlp.linear_fc2", "--lora-r", "4", "--lora-alpha", "8"]


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                     LOCAL_RANK="0").items():
        monkeypatch.setenv(k, v)


def train(flags, models=None):
    def factory(args, model_cfg):
        task = standin_task(args)
        provider = task.model_provider

        def recording(pre, post, vp):
            model = provider(pre, post, vp)
            if models is not None:
                models.extend([model, {n: p.detach().clone() for n, p in model.named_parameters()}])
            return model

        task.model_provider = recording
        return task

    return main(FLAGS + flags, task_factory=factory)


def test_lora_trains_adapters_only():
    models = []
    base_run = train(["--train-iters", "1", "--lr", "1e-12"])  # ~no update: step-1 loss of the base model
    result = train([], models)
    model, before = models[0], models[1]  # the model, and its parameters before LoRA was added
    params = dict(model.named_parameters())
    lora = {n for n in params if ".lora_" in n}
    assert {n for n, p in params.items() if p.requires_grad} == lora
    assert "decoder.layers.0.self_attention.linear_qkv.lora_A.weight" in lora
    assert "decoder.layers.1.mlp.linear_fc2.lora_B.weight" in lora
    assert "decoder.layers.0.mlp.linear_fc2.lora_B.weight" not in params  # path-restricted target
    assert "output_layer.lora_A.weight" not in params
    assert set(before) == set(params) - lora
    for name, p in before.items():  # every base tensor bit-identical after 3 steps
        assert torch.equal(params[name], p), name
    assert all(params[n].abs().sum() > 0 for n in lora if ".lora_B." in n)  # B moved from zero
    # step 1 of a LoRA run is the base model's loss (B = 0), and training lowers it
    assert result.losses[1] == base_run.losses[1]
    assert result.losses[3] < result.losses[1]


def test_lora_checkpoint_resume_and_base_load(tmp_path):
    full = train(["--train-iters", "4"])
    ckpt = tmp_path / "lora"
    stopped = train(["--train-iters", "4", "--save", str(ckpt), "--save-interval", "2", "--exit-interval", "2"])
    state = torch.load(ckpt / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    assert any(".lora_B." in k for k in state["model"]) and state["args"]["lora_alpha"] == 8
    resumed = train(["--train-iters", "4", "--load", str(ckpt)])
    assert [stopped.losses[i] for i in (1, 2)] == [full.losses[i] for i in (1, 2)]
    assert [resumed.losses[i] for i in (3, 4)] == [full.losses[i] for i in (3, 4)]  # bit for bit

    # a base checkpoint (no LoRA keys, tracker "release") loads; the adapters start from their init
    base = {k: v for k, v in state["model"].items() if ".lora_" not in k and not k.endswith("_extra_state")}
    release = tmp_path / "base"
    (release / "release" / "mp_rank_00").mkdir(parents=True)
    torch.save({"model": base, "checkpoint_version": 3.0}, release / "release" / "mp_rank_00" / "model_optim_rng.pt")
    (release / "latest_checkpointed_iteration.txt").write_text("release")
    assert train(["--train-iters", "1", "--load", str(release)]).losses[1] == full.losses[1]
    # LoRA weights loaded into a model without adapters: a clear error
    with pytest.raises(KeyError, match="holds LoRA weights"):
        main(["--lr", "1e-3", "--train-iters", "1", "--load", str(ckpt), "--finetune"],
             task_factory=lambda a, c: standin_task(a))
