"""Hugging Face names of what model.json can express, shared by every family's config adapter."""

# transformers' ACT2FN name -> model.json ``activation_func``. Aliases compute the same function
# (``gelu_python`` = erf GELU, ``gelu_new`` / ``gelu_python_tanh`` = tanh GELU: equal up to rounding).
HF_ACTIVATIONS = {
    "silu": "silu", "swish": "silu",
    "gelu": "gelu", "gelu_python": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
    "gelu_fast": "fast_gelu",
    "quick_gelu": "quick_gelu",
}
# rope types of the text decoder: transformers' plain rotary with M-RoPE sections ("mrope" is the older
# name of the same thing); every scaled type (linear, dynamic, yarn, longrope, llama3, ...) is refused.
TEXT_ROPE_TYPES = ("default", "mrope")
