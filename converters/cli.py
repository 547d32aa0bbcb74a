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

from converters.qwen2_5_omni.converter import Qwen2_5_OmniConverter

CONVERTERS = {"Qwen2_5_OmniConverter": Qwen2_5_OmniConverter}


def main(argv: Optional[Sequence[str]] = None) -> None:
    import jsonargparse

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # a dict of components keeps MindSpeed-MM's "mm-convert <Converter> <command>" form even with one converter
    jsonargparse.CLI(CONVERTERS, args=None if argv is None else list(argv),
                     description="Convert Qwen2.5-Omni checkpoints between Hugging Face and Megatron layouts.")


if __name__ == "__main__":
    main()
