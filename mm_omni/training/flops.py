"""Device peaks for ``--log-tps``'s MFU; the model FLOPs of a micro-batch come from the model's side.

A task counts each micro-batch's model FLOPs with its model's formula (``TrainTask.count_flops``;
each stack declares its own: :mod:`mm_omni.models.text.flops`, the encoders' ``flops`` modules, their
composition in :mod:`mm_omni.models.omni_flops`) and the loop divides by the peak found here.
"""

from __future__ import annotations

from typing import Optional

# dense bf16/fp16 tensor-core peaks (TFLOP/s, no sparsity), matched on the device name
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("H20", 148.0),
               ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0))


def peak_tflops(device_name: str) -> Optional[float]:
    for key, value in PEAK_TFLOPS:
        if key in device_name:
            return value
    return None
