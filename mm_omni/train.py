"""Training entry: ``torchrun ... -m mm_omni.train <MindSpeed-MM / Megatron flags>`` (or ``mm-omni train``).

Order matters: flags are parsed and validated (and model.json read) before any process group or
model exists, so a bad launch fails in a second, naming the flag, the value and the fix.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Optional, Sequence

from mm_omni.config.arguments import ArgumentsError, log_accepted_flags, parse_args, validate_args

logger = logging.getLogger("mm_omni.train")


def setup_logging() -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, force=True,
                        format=f"[rank{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s")
    # megatron-core logs every parameter of every DDP bucket at INFO: keep its warnings only
    logging.getLogger("megatron").setLevel(logging.WARNING)


def prepare_args(argv: Optional[Sequence[str]] = None):
    """Parse + validate (no process group, no model): returns (args, model config or None)."""
    args = parse_args(argv)
    model_cfg = None
    if args.mm_model:
        from mm_omni.registry import load_model_config

        family, model_cfg = load_model_config(args.mm_model)  # the family is chosen by model.json's model_id keys
        args.model_family = family.name
        if args.mm_data:
            model_cfg = _token_ids_from_tokenizer(model_cfg, args.mm_data)
        chunks = len(model_cfg.text_decoder.stage_layers())
        if chunks > 1 and args.virtual_pipeline_model_parallel_size is None:
            args.virtual_pipeline_model_parallel_size = chunks  # model.json's nested pipeline_num_layers
    world = int(os.environ.get("WORLD_SIZE", "1"))
    validate_args(args, world, model_cfg)
    if args.tensorboard_dir:
        from mm_omni.training.metrics import require_tensorboard

        require_tensorboard(args.tensorboard_dir)
    if args.mm_tool:
        logger.info("--mm-tool %s accepted: MindSpeed-MM's tools (profiling, memory snapshots) are not run here; "
                    "use torch.profiler around mm_omni.training.loop.train instead", args.mm_tool)
    if args.num_workers is not None and not args.mm_data:
        logger.debug("--num-workers without --mm-data: unused")
    return args, model_cfg


def _token_ids_from_tokenizer(model_cfg, data_path: str):
    """Fill model.json's omitted special token ids from the data's tokenizer; a stated id must agree with it."""
    from mm_omni.config.data import load_data_config
    from mm_omni.registry import for_template

    data_cfg = load_data_config(data_path)
    tokenizer_dir = data_cfg.dataset_param.preprocess_parameters.model_name_or_path
    template = for_template(data_cfg.dataset_param.basic_parameters.template, data_path).load("template")
    try:
        tokens = template.special_tokens(template.load_processor(tokenizer_dir))
    except (OSError, ValueError) as err:
        raise ValueError(f"--mm-data {data_path}: cannot load the processor/tokenizer of "
                         f"preprocess_parameters.model_name_or_path={tokenizer_dir!r}: {err}") from None
    return model_cfg.with_tokenizer_ids(template.model_token_ids(tokens), source=tokenizer_dir)


def main(argv: Optional[Sequence[str]] = None, task_factory: Optional[Callable] = None,
         keep_process_group: bool = False):
    """Run training; ``task_factory(args, model_cfg)`` gives the model + data (default: the task of the
    model.json's family, :mod:`mm_omni.registry`).

    ``keep_process_group`` leaves torch.distributed up afterwards (several runs in one launch: tests).
    """
    setup_logging()
    try:
        args, model_cfg = prepare_args(argv)
    except (ArgumentsError, ValueError, FileNotFoundError, ImportError) as err:
        logger.error("%s", err)
        raise SystemExit(2) from None
    log_accepted_flags(args, model_cfg)

    from mm_omni.training.initialize import destroy, initialize_distributed
    from mm_omni.training.loop import train

    initialize_distributed(args)
    if task_factory is None:
        from mm_omni.registry import by_name

        if model_cfg is None:
            raise SystemExit("--mm-model is required: the model.json to train (its model_id picks the model family)")
        task_factory = by_name(args.model_family).load("task")
    task = task_factory(args, model_cfg)
    try:
        return train(args, task)
    finally:
        destroy(keep_process_group)


if __name__ == "__main__":
    main()
