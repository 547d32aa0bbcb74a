"""LoRA through ``mm_omni.train`` (1 process, stand-in GPT): base frozen bit for bit, adapters train,
saves hold only the adapters (+ their optimizer state, RNG, position), ``--load BASE --lora-load DIR``
resumes them bit for bit (plain and distributed optimizer), a base checkpoint loads into a LoRA model,
and mismatched adapters fail naming the flag."""

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


def _release_checkpoint(path, model_sd: dict):
    """A base checkpoint as mm-convert writes it: model weights only, tracker "release"."""
    (path / "release" / "mp_rank_00").mkdir(parents=True)
    sd = {k: v for k, v in model_sd.items() if not k.endswith("_extra_state")}
    torch.save({"model": sd, "checkpoint_version": 3.0}, path / "release" / "mp_rank_00" / "model_optim_rng.pt")
    (path / "latest_checkpointed_iteration.txt").write_text("release")
    return path


@pytest.fixture
def base(tmp_path):
    """The stand-in's initial weights (before any adapter is added) as a release checkpoint."""
    models = []
    train(["--train-iters", "1", "--lr", "1e-12"], models)
    return _release_checkpoint(tmp_path / "base", models[1])


@pytest.mark.parametrize("optimizer", [[], ["--use-distributed-optimizer"], ["--bf16"]],
                         ids=["adam", "distributed", "bf16"])  # bf16: the fp32 main copies come back too
def test_lora_saves_adapters_only_and_resume_is_exact(tmp_path, base, optimizer):
    models = []
    full = train(optimizer + ["--train-iters", "4", "--load", str(base)], models)
    lora_names = {n for n, p in models[0].named_parameters() if p.requires_grad}
    lora_numel = sum(p.numel() for p in models[0].parameters() if p.requires_grad)
    ckpt = str(tmp_path / "lora")
    # one command for the first launch and every restart: --lora-load may be the (still empty) --save dir
    flags = optimizer + ["--train-iters", "4", "--load", str(base), "--lora-load", ckpt, "--save", ckpt,
                         "--save-interval", "2"]
    stopped = train(flags + ["--exit-interval", "2"])
    assert [stopped.losses[i] for i in (1, 2)] == [full.losses[i] for i in (1, 2)]

    path = tmp_path / "lora" / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=True)
    assert state["lora_only"] is True and state["args"]["lora_alpha"] == 8
    assert set(state["model"]) == lora_names and all(".lora_" in k for k in lora_names)  # no base tensor
    assert {"optimizer", "opt_param_scheduler", "rng_state"} <= set(state)
    assert state["iteration"] == 2 and state["consumed_train_samples"] == 4
    base_file = base / "release" / "mp_rank_00" / "model_optim_rng.pt"
    base_bytes = sum(t.numel() * t.element_size() for t in torch.load(base_file, weights_only=True)["model"].values())
    lora_bytes = sum(t.numel() * t.element_size() for t in state["model"].values())
    assert lora_bytes * 7 < base_bytes  # r=4 on a 32-wide model: 4992 of 42144 parameters
    assert path.stat().st_size < base_file.stat().st_size  # adapters + their Adam states + RNG + args
    if "--use-distributed-optimizer" in optimizer:  # megatron's sharded optimizer state: the adapters' only
        buckets = torch.load(path.parent / "distrib_optim.pt", weights_only=True)["buckets"]
        shards = [st for b in buckets for per_bucket in b.values() if isinstance(per_bucket, dict)
                  for st in per_bucket.values()]
        assert sum(st["numel_unpadded"] for st in shards) == lora_numel
        assert {"param", "exp_avg", "exp_avg_sq"} <= set(shards[0])

    resumed = train(flags)
    assert sorted(resumed.losses) == [3, 4]
    assert [resumed.losses[i] for i in (3, 4)] == [full.losses[i] for i in (3, 4)]  # bit for bit

    # the adapter-only checkpoint alone is not a model: --load names what to do
    with pytest.raises(ValueError, match="--lora-load"):
        train(["--train-iters", "4", "--load", ckpt])


def test_base_checkpoint_loads_into_a_lora_model(tmp_path, base):
    full = train(["--train-iters", "1"])
    assert train(["--train-iters", "1", "--load", str(base)]).losses[1] == full.losses[1]  # adapters at their init
    # a combined checkpoint (base + adapters) loaded into a model without adapters: a clear error
    models = []
    train(["--train-iters", "1", "--lr", "1e-12"], models)
    combined = _release_checkpoint(tmp_path / "combined", models[0].state_dict())
    with pytest.raises(KeyError, match="holds LoRA weights"):
        main(["--lr", "1e-3", "--train-iters", "1", "--load", str(combined), "--finetune"],
             task_factory=lambda a, c: standin_task(a))


def test_lora_load_mismatches_fail_naming_the_flag(tmp_path, base):
    from mm_omni.config.arguments import ArgumentsError
    from mm_omni.train import prepare_args

    ckpt = str(tmp_path / "lora")
    train(["--train-iters", "1", "--load", str(base), "--save", ckpt])
    with pytest.raises(FileNotFoundError, match="--lora-load .*no latest_checkpointed_iteration.txt"):
        train(["--load", str(base), "--lora-load", str(tmp_path / "typo")])  # not the --save dir: no fresh start
    with pytest.raises(ValueError, match="--lora-r"):
        train(["--load", str(base), "--lora-load", ckpt, "--lora-r", "2"])
    with pytest.raises(KeyError, match="missing .*linear_fc2.lora_A.weight.*--lora-target-modules"):
        train(["--load", str(base), "--lora-load", ckpt, "--lora-target-modules", "linear_fc2"])
    with pytest.raises(ArgumentsError, match="--lora-load=.*give --load BASE"):
        prepare_args(FLAGS + ["--lora-load", ckpt])
    with pytest.raises(ArgumentsError, match="--lora-load=.*LoRA is off"):
        prepare_args(["--lr", "1e-3", "--train-iters", "1", "--load", str(base), "--lora-load", ckpt])
