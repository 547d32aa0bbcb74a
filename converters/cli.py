"""``mm-convert``: MindSpeed-MM's converter command line.

    mm-convert Qwen2_5_OmniConverter hf_to_mm --cfg.mm_dir OUT --cfg.hf_config.hf_dir HF \\
        --cfg.parallel_config.llm_pp_layers [[11,17]] --cfg.parallel_config.vit_pp_layers [[32,0]] \\
        --cfg.parallel_config.audio_pp_layers [[32,0]] --cfg.parallel_config.tp_size 1
    mm-convert Qwen2_5_OmniConverter mm_to_hf --cfg.save_hf_dir OUT --cfg.mm_dir MM --cfg.hf_config.hf_dir HF
    mm-convert Qwen2_5_OmniConverter resplit --cfg.source_dir MM --cfg.target_dir OUT \\
        --cfg.target_parallel_config.llm_pp_layers [[28]] ...

``mm-convert Qwen2_5_OmniConverter hf_to_mm --help`` lists every option with its meaning.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

from mm_omni.registry import families


def converters() -> dict:
    """``<Converter name> -> class`` of every registered model family (mm_omni.registry)."""
    return {family.converter: family.load("converter") for family in families()}


def main(argv: Optional[Sequence[str]] = None) -> None:
    import jsonargparse

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # a dict of components keeps MindSpeed-MM's "mm-convert <Converter> <command>" form
    jsonargparse.CLI(converters(), args=None if argv is None else list(argv),
                     description="Convert checkpoints of the registered model families between Hugging Face and "
                                 "Megatron layouts.")


if __name__ == "__main__":
    main()
