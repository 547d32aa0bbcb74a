"""``--expert-model-parallel-size`` / ``--expert-tensor-parallel-size``: checked against model.json and the world
before any process group or model exists; every error names the flag, the value and the fix."""

from __future__ import annotations

import pytest

from mm_omni.config.arguments import ArgumentsError, parse_args, validate_args
from mm_omni.config.model import TextDecoderConfig

BASE = ["--train-iters", "10", "--lr", "1e-5"]


class _Model:
    def __init__(self, **text):
        fields = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                      vocab_size=1024, mrope_section=[2, 3, 3])
        self.text_decoder = TextDecoderConfig(**{**fields, **text})


MOE = dict(gated_linear_unit=True, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_token_dispatcher_type="alltoall")


def _validate(flags, world=2, model=None):
    return validate_args(parse_args(BASE + flags), world, model)


def test_ep_on_a_moe_model_validates():
    args = _validate(["--expert-model-parallel-size", "2"], world=2, model=_Model(**MOE))
    assert args.expert_model_parallel_size == 2 and args.data_parallel_size == 2
    args = _validate(["--expert-model-parallel-size", "4"], world=4, model=_Model(**MOE))
    assert args.expert_model_parallel_size == 4
    assert parse_args(BASE).expert_model_parallel_size == 1  # default: no expert parallelism


@pytest.mark.parametrize("flags,world,model,says", [
    (["--expert-model-parallel-size", "2"], 2, _Model(), "the model has no experts"),
    (["--expert-model-parallel-size", "3"], 3, _Model(**MOE), "must divide text_decoder.num_moe_experts=4"),
    (["--expert-model-parallel-size", "4"], 2, _Model(**MOE), "must divide the 2 ranks of a pipeline stage"),
    (["--expert-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 2, _Model(**MOE),
     "must divide the 1 ranks of a pipeline stage"),
    (["--expert-model-parallel-size", "0"], 2, _Model(**MOE), "must be >= 1"),
    (["--expert-model-parallel-size", "2"], 2, _Model(**{**MOE, "moe_token_dispatcher_type": "allgather"}),
     "set moe_token_dispatcher_type to 'alltoall'"),
])
def test_ep_errors_name_the_flag(flags, world, model, says):
    with pytest.raises(ArgumentsError) as err:
        _validate(flags, world, model)
    assert str(err.value).startswith(f"--expert-model-parallel-size={flags[1]}:"), err.value
    assert says in str(err.value), err.value


def test_expert_tensor_parallel_other_than_tp_is_refused_by_name():
    with pytest.raises(ArgumentsError, match=r"^--expert-tensor-parallel-size=1: only the tensor-parallel size \(2\)"):
        _validate(["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-tensor-parallel-size", "1"],
                  world=2, model=_Model(**MOE))
    args = _validate(["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-tensor-parallel-size", "2"],
                     world=2, model=_Model(**MOE))
    assert args.expert_tensor_parallel_size == 2


def test_moe_at_tp2_needs_sequence_parallel_before_any_model():
    with pytest.raises(ArgumentsError, match=r"^--sequence-parallel=False: text_decoder.num_moe_experts=4"):
        _validate(["--tensor-model-parallel-size", "2"], world=2, model=_Model(**MOE))
