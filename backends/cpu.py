"""CPU backend: everything on the host. Used for tests and tiny models.

Offload mechanisms run here too (onto and off the same device), which lets tests check that the
hooks are in place and that outputs are unchanged; they save no memory on a CPU.
"""

from __future__ import annotations

import os
import platform

import torch

from backends.base import Backend


class CPUBackend(Backend):
    name = "cpu"
    # Batching the two guidance passes gains nothing measurable on a CPU (within noise in
    # benchmarks/cpu_reference.py) and doubles activation memory: auto = sequential here.
    batched_guidance = False

    def _device(self) -> torch.device:
        return torch.device("cpu")

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "device": "cpu",
            "name": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "cores": os.cpu_count(),
        }
