"""Megatron checkpoints, written once for training and the converter.

* :mod:`~mm_omni.checkpoint.format`: the on-disk layout (tracker file, ``release`` / ``iter_NNNNNNN``,
  ``mp_rank_TT[_PPP[_EEE]]/model_optim_rng.pt``) and atomic directory / file writes;
* :mod:`~mm_omni.checkpoint.files`: reading one checkpoint file, naming a damaged one;
* :mod:`~mm_omni.checkpoint.tp`: tensor-parallel split / merge of one tensor by its split kind;
* :mod:`~mm_omni.checkpoint.fuse`: Megatron's fused QKV / gate-up rows;
* :mod:`~mm_omni.checkpoint.mapping`: the declarative Hugging Face <-> Megatron name table and its ops;
* :mod:`~mm_omni.checkpoint.spec`: what a model family declares to get a converter.

This package imports no model family; models, training and converters import it.
"""
