"""LoRA for megatron-core's tensor-parallel linears, and merging it back for export.

- :mod:`mm_omni.lora.layers`: the adapter on ``ColumnParallelLinear`` / ``RowParallelLinear``
  (TP-correct A/B shards, sequence parallel included);
- :mod:`mm_omni.lora.inject`: ``--lora-target-modules`` matching, adding adapters, freezing the base;
- :mod:`mm_omni.lora.merge`: ``W + scale * B @ A`` on state dicts (pure torch: the converter uses it);
- :mod:`mm_omni.lora.sizes`: what an adapter-only checkpoint weighs next to its base, from the shapes.

Checkpoints of a LoRA run hold only what trains (:mod:`mm_omni.training.checkpointing`, ``--lora-load``).

Nothing is imported here, so that the converter can import :mod:`mm_omni.lora.merge` without
megatron-core.
"""
