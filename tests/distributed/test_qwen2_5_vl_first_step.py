"""MindSpeed-MM's Qwen2.5-VL client files train here and the first step's loss is transformers'.

MindSpeed-MM's examples/qwen2.5vl/model_3b.json with the tiny model's sizes (and fp32) written over its own, every
other key as shipped (the released tokenizer's ``img_context_token_id`` / ``vision_start_token_id``, the 3B's
vocabulary of 151936 and tied output layer, ``use_remove_padding``, the ``patch`` block); its data_7b.json with
the paths pointed at a tiny processor (the released special-token ids) and a tiny dataset (text and image rows:
``attr.videos`` is null there); the flags of its finetune_qwen2_5_vl_7b.sh with sizes and paths shrunk
(``pretrain_vlm.py`` -> ``-m mm_omni.train``, ``--bf16`` dropped for fp32, gloo instead of nccl, 2 processes at
PP=2, ``--context-parallel-algo ulysses_cp_algo`` kept). The checkpoint is a random tiny
``Qwen2_5_VLForConditionalGeneration`` saved by transformers and converted with ``mm-convert Qwen2_5_VLConverter
hf_to_mm`` (text layers [1, 2], vision [4, 0]). transformers' model, loaded from the same directory, then runs on
exactly the micro-batches the run consumed (recorded by tests/distributed/first_step_worker.py) and computes its
own positions (``get_rope_index``) on the rows of each (token-budget packed) micro-batch, padded; its loss,
reduced like the run's (the mean over label tokens of each micro-batch, averaged over micro-batches), must
equal the logged iteration-1 loss at rel 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.distributed.test_qwen2_5_vl_parallel import write_vl_data
from tests.distributed.torchrun import run_torchrun
from tests.helpers import randomize_

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "qwen2.5vl"
WORKER = Path(__file__).with_name("first_step_worker.py")
RTOL = 1e-5
pytestmark = pytest.mark.distributed

ROWS = [
    {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
    {"messages": [{"role": "user", "content": "<image>What is in this image?"},
                  {"role": "assistant", "content": "A cat is playing with a ball."}], "images": ["a.png"]},
    {"messages": [{"role": "user", "content": "<image><image>Compare these two pictures."},
                  {"role": "assistant", "content": "A dog and a fox."}], "images": ["a.png", "b.png"]},
    {"messages": [{"role": "user", "content": "Describe <image> briefly."},
                  {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."}],
     "images": ["b.png"]},
]
SIZE_KEYS = {"num_layers", "hidden_size", "ffn_hidden_size", "intermediate_size", "llm_hidden_size",
             "num_attention_heads", "num_query_groups", "window_attn_size", "fullatt_block_indexes", "input_size",
             "mrope_section", "pipeline_num_layers"}
DTYPE_KEYS = {"params_dtype": "fp32", "bf16": False, "fp16": False}
GRAD_ACC_STEP = 4  # MindSpeed-MM's 48 shrunk: 4 micro-batches of 1 pack (MBS 1) at DP 1


def shrunk_model_json(tiny_model_json: Path, out: Path) -> Path:
    """examples/qwen2.5vl/model_3b.json with the tiny model's sizes (and fp32) written over its own."""
    shipped = json.loads((EXAMPLES / "model_3b.json").read_text())
    tiny = json.loads(tiny_model_json.read_text())

    def shrink(node: dict, small: dict) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                shrink(value, small.get(key) or {})
            elif key in SIZE_KEYS:
                node[key] = small[key]
            elif key in DTYPE_KEYS:
                node[key] = DTYPE_KEYS[key]

    shrink(shipped, tiny)
    assert "image_token_id" not in shipped and shipped["vision_start_token_id"] == 151652  # as shipped
    assert shipped["text_decoder"]["vocab_size"] == 151936 and not shipped["text_decoder"][
        "untie_embeddings_and_output_weights"]
    out.write_text(json.dumps(shipped))
    return out


def shipped_data_json(d: Path, out: Path) -> Path:
    """examples/qwen2.5vl/data_7b.json with its paths pointed at the tiny processor and dataset."""
    data = json.loads((EXAMPLES / "data_7b.json").read_text())
    tiny = json.loads((d / "data.json").read_text())["dataset_param"]
    data["dataset_param"]["preprocess_parameters"]["model_name_or_path"] = tiny["preprocess_parameters"][
        "model_name_or_path"]
    basic = data["dataset_param"]["basic_parameters"]
    basic.update(dataset_dir=tiny["basic_parameters"]["dataset_dir"], dataset=tiny["basic_parameters"]["dataset"],
                 cache_dir=str(d / "cache_dir"))
    out.write_text(json.dumps(data))
    return out


def launcher_flags(model_json: Path, data_json: Path, load: Path, save: Path) -> list[str]:
    """finetune_qwen2_5_vl_7b.sh's flags (in its order), sizes and paths shrunk, fp32, gloo."""
    return f"""
--use-mcore-models --tensor-model-parallel-size 1 --pipeline-model-parallel-size 2 --context-parallel-size 1
--context-parallel-algo ulysses_cp_algo --micro-batch-size 1 --global-batch-size {GRAD_ACC_STEP}
--tokenizer-type NullTokenizer --vocab-size 151936 --seq-length 1024 --make-vocab-size-divisible-by 1
--normalization RMSNorm --use-fused-rmsnorm --swiglu --use-fused-swiglu --no-masked-softmax-fusion --lr 1.0e-5
--lr-decay-style cosine --weight-decay 0 --train-iters 1 --lr-warmup-fraction 0.1 --clip-grad 0.0
--adam-beta1 0.9 --adam-beta2 0.999 --seed 42 --load {load} --use-flash-attn --variable-seq-lengths
--use-distributed-optimizer --no-load-optim --no-load-rng --no-save-optim --no-save-rng --num-workers 0
--distributed-timeout-minutes 20 --mm-data {data_json} --mm-model {model_json}
--mm-tool ./mindspeed_mm/tools/tools.json --log-interval 1 --save-interval 10000 --eval-interval 10000
--eval-iters 5000 --save {save} --ckpt-format torch --log-tps --distributed-backend gloo
""".split()


def hf_checkpoint(path: Path) -> Path:
    """A random tiny Qwen2.5-VL at the released tokenizer's ids, the 3B's vocabulary and tied output layer."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from tests.fixtures.qwen2_5_vl import QWEN_VL_TOKEN_IDS, tiny_vl_config

    cfg = tiny_vl_config(tie_word_embeddings=True, text={"vocab_size": 151936, "bos_token_id": 151643,
                                                         "eos_token_id": 151645}, **QWEN_VL_TOKEN_IDS)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).float()
    randomize_(model, 1, scale=0.1)  # away from a near-uniform output, so the loss depends on every input
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def first_step(tmp_path_factory):
    from converters.config import HfToMmConfig
    from mm_omni.registry import by_name
    from tests.fixtures.qwen2_5_vl import QWEN_VL_SPECIAL_TOKENS

    d = tmp_path_factory.mktemp("vl_first_step")
    hf_dir = hf_checkpoint(d / "hf")
    write_vl_data(d, ROWS, special_tokens=QWEN_VL_SPECIAL_TOKENS)
    (d / "processor" / "config.json").write_text((hf_dir / "config.json").read_text())  # as in a real checkpoint
    by_name("qwen2_5_vl").load("converter").hf_to_mm(HfToMmConfig(
        mm_dir=d / "mm", hf_config={"hf_dir": hf_dir},
        parallel_config=dict(llm_pp_layers=[[1, 2]], vit_pp_layers=[[4, 0]], tp_size=1)))
    model_json = shrunk_model_json(d / "mm" / "model.json", d / "model_3b_shrunk.json")
    data_json = shipped_data_json(d, d / "data_7b_paths.json")
    out = d / "out"
    out.mkdir()
    stdout = run_torchrun(WORKER, 2, str(out), "pp2", *launcher_flags(model_json, data_json, d / "mm", d / "save"))
    records = [torch.load(out / f"pp2.rank{r}.pt", weights_only=False) for r in range(2)]
    for r in records:
        assert "error" not in r, r.get("error")
    return hf_dir, records, stdout


def unpacked(batch: dict) -> dict:
    """A recorded packed micro-batch (data_7b.json packs to the token budget) as padded rows for transformers:
    one row per ``cu_seqlens`` sequence that holds tokens (the bucket padding's holds none); media stay in row
    order."""
    cu = batch["cu_seqlens"].tolist()
    spans = [(a, b) for a, b in zip(cu[:-1], cu[1:]) if batch["attention_mask"][0, a:b].any()]
    s = max(b - a for a, b in spans)
    out = {k: v for k, v in batch.items() if k in ("pixel_values", "image_grid_thw")}
    out.update(input_ids=torch.zeros(len(spans), s, dtype=torch.long),
               labels=torch.full((len(spans), s), -100, dtype=torch.long),
               attention_mask=torch.zeros(len(spans), s, dtype=torch.long))
    for i, (a, b) in enumerate(spans):
        for key in ("input_ids", "labels", "attention_mask"):
            out[key][i, :b - a] = batch[key][0, a:b]
    return out


def hf_loss(model, batch, image_token_id: int, blank_media: bool = False) -> torch.Tensor:
    """transformers on one recorded micro-batch, its own positions: the mean over label tokens."""
    batch = unpacked(batch)
    ids = batch["input_ids"]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw") if k in batch}
    inputs["mm_token_type_ids"] = (ids == image_token_id).int()  # what the processor returns (images only here)
    if blank_media and "pixel_values" in inputs:
        inputs["pixel_values"] = torch.zeros_like(inputs["pixel_values"])
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    labels = batch["labels"][:, 1:]
    valid = labels != -100
    return torch.nn.functional.cross_entropy(logits[:, :-1][valid], labels[valid])


def test_first_step_loss_equals_transformers(first_step):
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf_dir, records, stdout = first_step
    assert " iteration        1/       1 |" in stdout and "lm loss:" in stdout
    assert "--context-parallel-algo ulysses_cp_algo accepted" in stdout
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    image_token_id = model.config.image_token_id
    got = [r["losses"][1] for r in records if 1 in r["losses"]]
    assert got, "no rank reported the loss of iteration 1"
    batches = [b for r in records if r["pp"] == 0 for b in r["batches"]]
    assert len(batches) == GRAD_ACC_STEP
    ref = float(sum(hf_loss(model, b, image_token_id) for b in batches) / len(batches))
    rel = abs(got[-1] - ref) / abs(ref)
    print(f"iteration-1 loss {got[-1]:.8f}, transformers {ref:.8f}, rel {rel:.2e}")
    assert rel < RTOL, f"logged {got[-1]} vs transformers {ref} (rel {rel:.2e})"
    blind = float(sum(hf_loss(model, b, image_token_id, blank_media=True) for b in batches) / len(batches))
    assert abs(blind - ref) / abs(ref) > 100 * RTOL, f"the loss hardly depends on the images ({blind})"
    rows = {tuple(r[m.bool()].tolist()) for b in map(unpacked, batches) for r, m in zip(b["input_ids"],
                                                                                     b["attention_mask"])}
    assert len(rows) == len(ROWS) and sum(int(image_token_id in r) for r in rows) == 3
