"""LoRA for megatron-core's tensor-parallel linears, and merging it back for export.

- :mod:`mm_omni.lora.layers`: the adapter on ``ColumnParallelLinear`` / ``RowParallelLinear``
  (TP-correct A/B shards, sequence parallel included);
- :mod:`mm_omni.lora.inject`: ``--lora-target-modules`` matching, adding adapters, freezing the base;
- :mod:`mm_omni.lora.merge`: ``W + scale * B @ A`` on state dicts (pure torch: the converter uses it).

Nothing is imported here, so that the converter can import :mod:`mm_omni.lora.merge` without
megatron-core.
"""
