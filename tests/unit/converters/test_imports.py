"""mm-convert starts without the training stack: building every family's converter imports no megatron."""

from __future__ import annotations

import subprocess
import sys


def test_converter_classes_import_no_megatron():
    code = ("import sys; from converters.cli import converters; found = converters(); "
            "assert 'Qwen2_5_OmniConverter' in found, sorted(found); "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('megatron', 'transformers')); "
            "assert not heavy, heavy[:5]")
    subprocess.run([sys.executable, "-c", code], check=True)
