"""pydantic schema of MindSpeed-MM's ``data.json`` (Qwen2.5-Omni fine-tuning).

A MindSpeed-MM ``data_7b.json`` loads as it is: every key it ships is accepted, keys that only
matter to its HF-datasets pipeline are accepted and documented as unused. Unknown keys are
errors that name the key and the fix; bad values name field, value and fix.

Our additions (all optional): ``basic_parameters.cutoff_len`` (MindSpeed-MM rejects it and uses
``--seq-length``; here it wins when given), ``basic_parameters.on_bad_sample``,
``basic_parameters.default_system``, ``preprocess_parameters.use_audio_in_video`` and
``dataloader_param.packing`` / ``packing_window`` / ``num_workers``.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)


class PreprocessParameters(_Strict):
    model_name_or_path: str
    use_fast_tokenizer: bool = True  # accepted; the Omni processor always loads the fast tokenizer
    split_special_tokens: bool = False
    image_max_pixels: int = Field(768 * 768, gt=0)
    image_min_pixels: int = Field(32 * 32, ge=0)
    video_max_pixels: int = Field(256 * 256, gt=0)
    video_min_pixels: int = Field(16 * 16, ge=0)
    video_fps: float = Field(2.0, gt=0)
    video_maxlen: int = Field(128, gt=0)
    audio_sampling_rate: int = Field(16000, gt=0)
    use_audio_in_video: bool = False
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _check_pixels(self):
        for kind in ("image", "video"):
            lo, hi = getattr(self, f"{kind}_min_pixels"), getattr(self, f"{kind}_max_pixels")
            if lo > hi:
                raise ValueError(
                    f"{kind}_min_pixels={lo} is larger than {kind}_max_pixels={hi}: "
                    f"set {kind}_min_pixels <= {kind}_max_pixels"
                )
        return self


class BasicParameters(_Strict):
    template: str = "qwen2_omni"  # a registered family's template (mm_omni.registry): qwen2_omni, qwen2vl, ...
    dataset_dir: str = "."
    dataset: str
    cache_dir: Optional[str] = None
    cutoff_len: Optional[int] = Field(None, gt=0)
    max_samples: Optional[int] = Field(None, gt=0)
    overwrite_cache: bool = False
    preprocessing_batch_size: int = Field(1000, gt=0)  # accepted; rows are processed one by one
    preprocessing_num_workers: Optional[int] = Field(None, ge=0)
    train_on_prompt: bool = False
    mask_history: bool = False
    tool_format: Optional[str] = None
    streaming: bool = False
    val_dataset: Optional[str] = None
    val_max_samples: Optional[int] = None
    val_rate: Optional[float] = None
    enable_thinking: bool = True
    packing: Optional[bool] = None
    default_system: Optional[str] = None
    on_bad_sample: Literal["error", "skip"] = "error"

    @field_validator("template")
    @classmethod
    def _registered_template(cls, name: str) -> str:
        from mm_omni.registry import for_template

        for_template(name)  # raises, listing the registered templates
        return name

    @field_validator("dataset")
    @classmethod
    def _check_dataset(cls, v: str) -> str:
        parts = v.split(",")
        if not v or any(not p.strip() for p in parts):
            raise ValueError(f"dataset={v!r}: give one or more files separated by ',' with no empty entries")
        return v

    @field_validator("tool_format", "val_dataset")
    @classmethod
    def _unsupported(cls, v, info):
        if v is not None:
            raise ValueError(f"{info.field_name}={v!r} is not supported by mm_omni: set it to null")
        return v

    @field_validator("streaming")
    @classmethod
    def _no_streaming(cls, v):
        if v:
            raise ValueError("streaming=true is not supported: set it to false (rows are preprocessed and cached)")
        return v

    def dataset_files(self) -> list[str]:
        return [p.strip() for p in self.dataset.split(",")]


class DatasetAttr(_Strict):
    """Column names of a row (LLaMA-Factory ``dataset_info`` style); null = auto-detect."""

    formatting: Literal["sharegpt", "swift", "alpaca"] = "sharegpt"
    ranking: bool = False
    messages: Optional[str] = None
    images: Optional[str] = None
    videos: Optional[str] = None
    audios: Optional[str] = None
    system: Optional[str] = None
    tools: Optional[str] = None
    role_tag: Optional[str] = None
    content_tag: Optional[str] = None
    user_tag: Optional[str] = None
    assistant_tag: Optional[str] = None
    observation_tag: Optional[str] = None
    function_tag: Optional[str] = None
    system_tag: Optional[str] = None
    prompt: Optional[str] = None
    query: Optional[str] = None
    response: Optional[str] = None
    history: Optional[str] = None
    chosen: Optional[str] = None
    rejected: Optional[str] = None

    @field_validator("formatting")
    @classmethod
    def _no_alpaca(cls, v):
        if v == "alpaca":
            raise ValueError("formatting='alpaca' is not supported: convert rows to sharegpt 'messages'")
        return v

    @field_validator("ranking")
    @classmethod
    def _no_ranking(cls, v):
        if v:
            raise ValueError("ranking=true (preference data) is not supported: set it to false")
        return v


class DatasetParam(_Strict):
    dataset_type: Literal["huggingface"] = "huggingface"
    preprocess_parameters: PreprocessParameters
    basic_parameters: BasicParameters
    attr: DatasetAttr = Field(default_factory=DatasetAttr)


class CollateParam(_Strict):
    model_name: str = "qwen2vl"  # accepted; there is one collator
    ignore_pad_token_for_loss: bool = True
    pad_to_multiple_of: int = Field(8, gt=0)


class DataloaderParam(_Strict):
    dataloader_mode: Literal["sampler"] = "sampler"
    sampler_type: Literal["BaseRandomBatchSampler", "SequentialSampler"] = "BaseRandomBatchSampler"
    shuffle: bool = True
    drop_last: bool = True
    num_workers: Optional[int] = Field(None, ge=0)
    pin_memory: bool = True
    # false: pad rows; "budget" (or true): token-budget packing to --seq-length (mm_omni.data.packing);
    # "micro_batch": the rows of one micro-batch concatenated into one sequence
    packing: Literal[False, "budget", "micro_batch"] = False
    packing_window: int = Field(512, gt=0)  # rows per first-fit-decreasing window of budget packing
    collate_param: CollateParam = Field(default_factory=CollateParam)

    @field_validator("packing", mode="before")
    @classmethod
    def _packing_mode(cls, v):
        if v is True:
            return "budget"
        if v is False or v in ("budget", "micro_batch"):
            return v
        raise ValueError(f"packing={v!r} is not a packing mode: set false (pad rows), true or \"budget\" "
                         "(pack rows up to --seq-length tokens), or \"micro_batch\" (concatenate the rows of "
                         "one micro-batch)")


class DataConfig(_Strict):
    dataset_param: DatasetParam
    dataloader_param: DataloaderParam = Field(default_factory=DataloaderParam)


def _describe(err: dict[str, Any], model: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        # Suggest the nearest allowed key, so a typo is a one-line fix.
        parent: Any = model
        for part in err["loc"][:-1]:
            field = getattr(parent, "model_fields", {}).get(part)
            ann = field.annotation if field is not None else None
            parent = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type)
                           and issubclass(a, BaseModel)), None) or ann
        allowed = list(getattr(parent, "model_fields", {}))
        near = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
        hint = f"did you mean {near[0]!r}?" if near else f"allowed keys: {', '.join(allowed)}"
        return f"unknown key {loc!r}: remove it ({hint})"
    if err["type"] == "missing":
        return f"{loc}: required key is missing: add it"
    return f"{loc}={err.get('input')!r}: {err['msg']}"


def load_data_config(source: str | Path | dict) -> DataConfig:
    """Load and validate ``data.json`` (path or dict); errors list every problem with its fix."""
    raw = source
    if not isinstance(source, dict):
        with open(source, encoding="utf-8") as f:
            raw = json.load(f)
    try:
        return DataConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e, DataConfig) for e in exc.errors()]
        raise ValueError(f"invalid data config {source if not isinstance(source, dict) else ''}:\n  "
                         + "\n  ".join(lines)) from None


def packing_budget(cfg: DataConfig, seq_length: Optional[int]) -> Optional[int]:
    """Tokens per pack under ``dataloader_param.packing: "budget"`` (``--seq-length``); None otherwise."""
    if cfg.dataloader_param.packing != "budget":
        return None
    if seq_length is None:
        raise ValueError("dataloader_param.packing='budget' packs rows up to --seq-length tokens, but no "
                         "--seq-length is given: pass --seq-length, or set dataloader_param.packing to false")
    cutoff = cfg.dataset_param.basic_parameters.cutoff_len
    if cutoff is not None and cutoff > seq_length:
        raise ValueError(f"basic_parameters.cutoff_len={cutoff} is longer than the packing budget --seq-length="
                         f"{seq_length} (dataloader_param.packing='budget'): set cutoff_len <= {seq_length}")
    return int(seq_length)


def resolve_cutoff_len(cfg: DataConfig, seq_length: Optional[int]) -> int:
    """``cutoff_len`` from data.json when given, else ``--seq-length``."""
    cutoff = cfg.dataset_param.basic_parameters.cutoff_len or seq_length
    if cutoff is None:
        raise ValueError("no truncation length: set basic_parameters.cutoff_len in data.json or pass --seq-length")
    return int(cutoff)
