"""A test-only backend on the virtual accelerator (tests/virtual_device.py), added the way any device is added:

- this file (`VirtualBackend`),
- its YAML, tests/conf/backend/virtual.yaml (found with `hydra.searchpath=[file://<repo>/tests/conf]`),
- one registry line: the entry point `virtual = tests.virtual_backend:VirtualBackend` of the group
  `contentv.backends` (a test writes it into a temporary `.dist-info` folder on PYTHONPATH), or, in-process,
  `backends.register("virtual", "tests.virtual_backend:VirtualBackend")`.

No production file names it. It behaves as an accelerator backend does: its own device (lazy:0), process-wide
set-up, kernels, statistics from `torch.lazy`'s memory counters, free memory from `mem_get_info`.

Lifetime of the device: `setup()` (the runtime calls it before any work; rule 10: process-wide switches live
there, never in the constructor, so building a backend only to validate a config installs nothing) installs
one `VirtualDevice` for the whole process, shared by every `VirtualBackend` built afterwards (demo.py builds
one to validate and another to run). It stays installed until `uninstall()` (test fixtures call it) or process
exit (an `atexit` hook). Installing after diffusers/transformers were imported is fine: the device is a
`torch.lazy` module plus torch function/dispatch modes, which libraries look up at call time. The modes are
per thread, so generation must run on the thread that called `setup()` (demo.py and Hydra's basic launcher do).
"""

from __future__ import annotations

import atexit
from collections.abc import Callable

import torch

from backends.base import Backend
from contentv.attention import AttentionKernel, sdpa
from contentv.errors import ConfigError
from tests.virtual_device import DEVICE, VirtualDevice

_INSTALLED: VirtualDevice | None = None


def install() -> VirtualDevice:
    """The process's virtual device, installed on first call (idempotent)."""
    global _INSTALLED
    if _INSTALLED is None:
        vd = VirtualDevice()
        vd.__enter__()
        _INSTALLED = vd
    return _INSTALLED


def installed() -> VirtualDevice | None:
    """The installed virtual device, or None."""
    return _INSTALLED


def uninstall() -> None:
    """Remove the virtual device (no-op if not installed); its tensors fail if used afterwards."""
    global _INSTALLED
    if _INSTALLED is not None:
        vd, _INSTALLED = _INSTALLED, None
        vd.__exit__(None, None, None)


atexit.register(uninstall)


class VirtualBackend(Backend):
    name = "virtual"
    # Group offload's side stream needs pinned host memory, which a CPU build of torch refuses.
    supports_offload_streams = False
    # One device per process and modes per thread: collectives would go through gloo, on host tensors only.
    process_group_backend = "gloo"
    # A setting of this device alone (backend.options.lanes), to show a device's options need no shared edit.
    OPTIONS = {"lanes": (1, int, "how many lanes the virtual device reports (recorded by describe())")}

    @classmethod
    def detect(cls) -> None:
        return None  # backend=auto never picks a test device

    def _device(self) -> torch.device:
        if self.cfg.device_index != 0:
            raise ConfigError("backend.device_index", self.cfg.device_index, "0 (the virtual device is lazy:0)")
        return DEVICE

    def _setup(self) -> None:
        install().module.set_device(self.device)

    def kernels(self) -> dict[str, Callable[[], AttentionKernel]]:
        # The virtual device runs SDPA whole on the CPU data (the CPU kernel, as a CPU run picks it).
        return {"sdpa": lambda: sdpa}

    @property
    def vd(self) -> VirtualDevice:
        """The virtual device (installing it if set-up has not run yet)."""
        self.setup()
        assert _INSTALLED is not None, "the virtual device was uninstalled while this backend is in use"
        return _INSTALLED

    def describe(self) -> dict:
        module = self.vd.module
        return {
            "backend": self.name,
            "device": str(self.device),
            "name": module.get_device_name(self.device),
            "total_memory_bytes": module.get_device_properties(self.device).total_memory,
            "lanes": self.options["lanes"],
        }

    def synchronize(self) -> None:
        self.vd.module.synchronize(self.device)

    def reset_peak_memory(self) -> None:
        self.vd.module.reset_peak_memory_stats(self.device)

    def peak_memory(self) -> int:
        return self.vd.module.max_memory_allocated(self.device)

    def empty_cache(self) -> None:
        self.vd.module.empty_cache()

    def free_memory(self) -> int:
        free, _ = self.vd.module.mem_get_info(self.device)
        return free + self.vd.module.memory_reserved(self.device)
