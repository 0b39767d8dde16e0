"""The one interface between the library and a device backend (`backends.Backend` implements it; a test checks that
every backend has each member and that the library uses no other).

`Capabilities` (contentv.memory_policy) is the part known without a device: a dry run plans for any backend with
it. `DeviceBackend` adds the device itself: placement, the attention kernel, memory statistics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from contentv.memory_policy import Capabilities

if TYPE_CHECKING:
    import torch

    from contentv.attention import AttentionKernel
    from contentv.config import MemoryConfig
    from contentv.registry import ModelSpec


def accelerator() -> torch.device | None:
    """The accelerator torch would use (CUDA, an NPU through torch_npu, ...), None when there is none or torch can't
    say: `torch.accelerator.is_available()` raises where PrivateUse1 was named by a device plugin whose device
    module is missing (a half-loaded plugin), and a run on the CPU must not fail for it."""
    import torch

    try:
        return torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    except RuntimeError:
        return None


class DeviceBackend(Capabilities, Protocol):
    """What the library asks of a device backend."""

    device: torch.device
    batched_guidance: bool  # memory.guidance_mode=auto: one batch-2 forward per step (accelerators), or two
    kernel_name: str  # the attention kernel `attention_kernel()` chose

    def setup(self) -> None:
        """Process-wide switches for the device; idempotent (the runtime calls it before any work)."""

    def attention_kernel(self) -> AttentionKernel:
        """The kernel backend.attention names (ConfigError for an unknown or unavailable one)."""

    def check_attention(self, attention: str, dtype: str) -> None:
        """ConfigError if the kernel `attention` can't take `dtype` (model.dtype) on this device (no device needed)."""

    def check_memory(self, memory: MemoryConfig) -> None:
        """ConfigError if this device can't run `memory`."""

    def free_memory(self) -> int | None:
        """Device bytes a new pipeline may use; None where unknown (the CPU)."""

    def prepare(self, pipe: Any, memory: MemoryConfig, spec: ModelSpec) -> dict:
        """Apply a resolved memory strategy and the kernel to a pipeline loaded on the CPU; what was applied."""

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """Whether `exc` is this device running out of memory."""

    def synchronize(self) -> None:
        """Wait for queued device work."""

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory window."""

    def peak_memory(self) -> int | None:
        """Peak device bytes since the last reset; None without such a counter."""

    def empty_cache(self) -> None:
        """Return cached device (and pinned host) memory."""

    def describe(self) -> dict:
        """The device, for the sidecar."""


MEMBERS = tuple(
    name
    for cls in (Capabilities, DeviceBackend)
    for name in (*cls.__annotations__, *vars(cls))
    if not name.startswith("_")
)
