"""The Backend abstraction: one device, its attention kernels, and how a pipeline is placed on it.

A backend is built once per process by the entry point, `setup()` once, then injected into
`contentv.Runtime`. Members (aim: about eight): name, device, setup, attention_kernel, prepare,
synchronize / reset_peak_memory / peak_memory / empty_cache (memory statistics), describe.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from backends import memory as mem
from contentv.attention import AttentionKernel, sdpa, sliced
from contentv.config import BackendConfig, MemoryConfig
from contentv.errors import ConfigError
from contentv.registry import ModelSpec

log = logging.getLogger(__name__)


class Backend(ABC):
    name: str = ""
    # Can diffusers' group offloading prefetch on a side stream here?
    supports_offload_streams: bool = False
    # memory.guidance_mode=auto: one batch-2 forward per step (accelerators) or two forwards (CPU).
    batched_guidance: bool = True

    def __init__(self, cfg: BackendConfig):
        self.cfg = cfg
        self.device = self._device()
        self.kernel_name = ""

    # ---------------------------------------------------------------- device

    @abstractmethod
    def _device(self) -> torch.device:
        """The device, after checking it is visible (ConfigError otherwise)."""

    def setup(self) -> None:
        """Process-wide switches; called once by the entry point, never at import time."""

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.device)}

    # ---------------------------------------------------------------- attention

    def kernels(self) -> dict[str, Callable[[], AttentionKernel]]:
        """Kernel name -> factory. The first entry is the default for `attention=auto`."""
        return {"sdpa": lambda: sdpa}

    def attention_kernel(self) -> AttentionKernel:
        """The kernel named by `backend.attention` (ConfigError for an unknown or unavailable one)."""
        table = self.kernels()
        name = self.cfg.attention
        if name == "auto":
            name = next(iter(table))
        if name not in table:
            raise ConfigError("backend.attention", name, ["auto", *table])
        self.kernel_name = name
        return table[name]()

    # ---------------------------------------------------------------- memory

    def check_memory(self, memory: MemoryConfig) -> None:
        """ConfigError if this backend can't run `memory` (contradictions, missing packages, capabilities)."""
        mem.check(memory, self)

    def quantization_methods(self) -> tuple[str, ...]:
        """memory.quantization values this device can run."""
        return ("none", "bnb_int8", "bnb_nf4", "fp8", "torchao_int8")

    def prepare(self, pipe, memory: MemoryConfig, spec: ModelSpec) -> dict:
        """Apply the memory strategy and attention kernel to a pipeline loaded on the CPU.

        Returns what was applied, for the run's record.
        """
        self.check_memory(memory)
        if memory.quantize is None:  # the family's default components
            memory = dataclasses.replace(memory, quantize=list(spec.quantize_default))
        applied: dict = {"memory_preset": memory.name}
        applied["quantization"] = mem.quantize(pipe, memory, self)
        kernel = self.attention_kernel()
        applied["attention_kernel"] = self.kernel_name
        if memory.attention_slicing:
            kernel = sliced(kernel, memory.attention_slicing)
            applied["attention_kernel"] += f" (query chunks of {memory.attention_slicing})"
        spec.install_attention(pipe, kernel)
        applied.update(mem.vae_options(pipe, memory))
        applied["placement"] = mem.place(pipe, memory, self.device, streams=self.supports_offload_streams)
        applied["text_encoders"] = mem.place_text_encoders(pipe, memory, self.device)
        log.info("prepared on %s: %s", self.device, applied)
        return applied

    # ---------------------------------------------------------------- statistics

    def synchronize(self) -> None:
        """Wait for queued device work (so timings are real)."""

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory window."""

    def peak_memory(self) -> int | None:
        """Peak device bytes allocated since the last reset; None where the device has no such counter."""
        return None

    def empty_cache(self) -> None:
        """Return cached blocks to the device."""

    def free_memory(self) -> int | None:
        """Bytes a new pipeline can use on the device (for memory=auto); None where unknown (CPU)."""
        return None
