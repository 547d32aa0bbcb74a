"""mm_omni: Megatron-core training for omni-modal models (Qwen2.5-Omni first)."""

from setuptools import find_packages, setup

setup(
    name="mm_omni",
    version="0.1.0",
    description="Megatron-core training framework for omni-modal models (Qwen2.5-Omni)",
    python_requires=">=3.10",
    packages=find_packages(include=["mm_omni", "mm_omni.*", "converters", "converters.*"]),
    install_requires=[
        "torch>=2.6",
        "torchvision",
        # tested with 0.16.1 (Python 3.10/3.11: 0.17+ needs Python >= 3.12, pip picks 0.16.x there) and
        # 0.19.2 (Python 3.12); the API differences live in mm_omni/megatron_compat.py.
        "megatron-core>=0.16.1,<0.20",
        # transformers moves under us: tested range (CI gets 5.23, the GPU machine has 5.17).
        "transformers>=5.17,<5.25",
        "safetensors>=0.4",
        "jsonargparse>=4.30",
        "docstring-parser",  # jsonargparse shows docstrings in --help with it
        "pydantic>=2.6",
        "tqdm",
        "numpy",
        "pillow",
        "librosa>=0.10",
        "soundfile",
        "av>=12",
    ],
    extras_require={
        # MindSpeed itself comes from its git repository (the PyPI 'mindspeed' is a placeholder
        # whose build fails): see README, "Ascend".
        "npu": ["torch-npu"],
        "dev": ["pytest>=8", "pytest-timeout", "peft>=0.21"],  # peft: the PEFT-export test loads the adapter
    },
    entry_points={
        "console_scripts": [
            "mm-convert=converters.cli:main",
            "mm-omni=mm_omni.cli:main",
        ]
    },
)
