"""mm-convert: Hugging Face <-> Megatron (MindSpeed-MM layout) checkpoint conversion.

Runs on a CPU box: nothing here imports the training stack (``mm_omni.models``, megatron).
"""
