"""The Backend abstraction: one device, its attention kernels, and how a pipeline is placed on it.

A backend is built by the entry point (or by a Python user), injected into `contentv.Runtime`, which calls
`setup()` (idempotent) before anything runs. Everything device-specific lives in the backend's own file:
device and its statistics, attention kernels, capabilities the memory policy asks about, the process-group
backend for multi-process launches and the attention that context parallelism uses. Adding a device = one
file here, one conf/backend/*.yaml, one line in backends/__init__.py's BACKENDS (README "Extending").
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from backends import memory as mem
from contentv import memory_policy
from contentv.attention import AttentionKernel, sdpa, sliced
from contentv.config import BackendConfig, MemoryConfig
from contentv.device import accelerator
from contentv.errors import ConfigError
from contentv.registry import ModelSpec

log = logging.getLogger(__name__)
HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Capabilities:
    """A backend's capabilities without its device (contentv.memory_policy.Capabilities): dry runs plan for any
    backend on any machine."""

    name: str
    supports_offload_streams: bool
    batched_guidance: bool
    quantizations: tuple[str, ...]
    half_precision_kernels: tuple[str, ...] = ()
    bnb_int8_dequant: str = "fp16"

    def quantization_methods(self) -> tuple[str, ...]:
        return self.quantizations

    def check_attention(self, attention: str, dtype: str) -> None:
        check_kernel_dtype(self.name, self.half_precision_kernels, attention, dtype)


def check_kernel_dtype(backend: str, half_only: tuple[str, ...], attention: str, dtype: str) -> None:
    """ConfigError when `attention` takes only 16-bit inputs and the model computes in `dtype`: caught here, before
    loading, since flash-attn's own dtype check fails only at the first forward (diffusers checks it only with
    DIFFUSERS_ATTN_CHECKS set)."""
    if attention in half_only and dtype not in ("bfloat16", "float16"):
        raise ConfigError(
            "backend.attention",
            attention,
            f"auto or sdpa with model.dtype={dtype} on {backend} ({attention} takes bfloat16 or float16 only; "
            "or set model.dtype=bfloat16)",
        )


def empty_host_cache() -> bool:
    """Give the pinned host memory that torch's caching host allocator keeps after its tensors die back to the OS
    (group offload with streams pins a copy of every weight: 24-38 GiB for ContentV-8B). torch >= 2.10:
    `torch.accelerator.empty_host_cache()` (CUDA, and torch_npu through the accelerator hooks); older CUDA builds:
    `torch._C._host_emptyCache()`. Both raise without an accelerator; False where nothing was released."""
    release = getattr(torch.accelerator, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    if release is None or accelerator() is None:
        return False
    try:
        release()
    except RuntimeError as exc:  # a device whose host allocator isn't registered with torch (older torch_npu)
        log.debug("pinned host memory not released: %s", exc)
        return False
    return True


class Backend(ABC):
    name: str = ""
    # Can diffusers' group offloading prefetch on a side stream here?
    supports_offload_streams: bool = False
    # memory.guidance_mode=auto: one batch-2 forward per step (accelerators) or two forwards (CPU).
    batched_guidance: bool = True
    # torch.distributed backend for a launch on this device. "cpu:gloo,<dev>:<lib>": device tensors go through
    # the collective library, host tensors (diffusers' split-size exchange in the uneven modes, object gathers)
    # through gloo without a device sync.
    process_group_backend: str = "gloo"

    # This backend's own settings, `backend.options.<name>`: name -> (default, the allowed values (a tuple) or
    # type, what it does). Checked here, by `check_options`: a device with a setting of its own needs no shared edit.
    OPTIONS: dict[str, tuple[Any, tuple | type, str]] = {}

    def __init__(self, cfg: BackendConfig):
        self.cfg = cfg
        if isinstance(cfg.device_index, bool) or not isinstance(cfg.device_index, int) or cfg.device_index < 0:
            raise ConfigError("backend.device_index", cfg.device_index, "an integer >= 0")
        self.options = self.check_options(cfg.options)
        self.device = self._device()
        self.kernel_name = ""
        self._set_up = False

    # ---------------------------------------------------------------- device

    @classmethod
    def check_options(cls, options: Any) -> dict[str, Any]:
        """`backend.options` with this backend's defaults filled in; ConfigError naming backend.options.<name> for a
        name this backend doesn't have or a value it doesn't take. Needs no device (dry runs call it too)."""
        if not isinstance(options, Mapping):
            raise ConfigError("backend.options", options, f"a mapping of {cls.name}'s options")
        for key, value in options.items():
            if key not in cls.OPTIONS:
                known = ", ".join(cls.OPTIONS) or "none"
                raise ConfigError(f"backend.options.{key}", value, f"an option of backend {cls.name} ({known})")
        out = {}
        for key, (default, allowed, _) in cls.OPTIONS.items():
            value = options.get(key, default)
            if isinstance(allowed, tuple) and value not in allowed:
                raise ConfigError(f"backend.options.{key}", value, allowed)
            if isinstance(allowed, type) and (
                not isinstance(value, allowed) or isinstance(value, bool) != (allowed is bool)
            ):
                raise ConfigError(f"backend.options.{key}", value, f"a value of type {allowed.__name__}")
            out[key] = value
        return out

    @classmethod
    def detect(cls) -> str | None:
        """backend=auto: why this device should be used here (it is present or asked for), else None.
        Must be cheap and import nothing device-specific it doesn't need."""
        return None

    @abstractmethod
    def _device(self) -> torch.device:
        """The device, after checking it is visible (ConfigError otherwise)."""

    def setup(self) -> None:
        """Process-wide switches for this device; the runtime calls it before any work. Idempotent."""
        if not self._set_up:
            self._setup()
            self._set_up = True

    def _setup(self) -> None:
        """The switches themselves (TF32/HF32, current device, ...); none by default."""

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

    def context_parallel_attention(self, dtype: torch.dtype, ring: bool) -> Any:
        """What computes the local attention under context parallelism: a diffusers attention backend name, or a
        forward op of diffusers' signature. Ring attention merges partial results by their log-sum-exp, so it needs
        a kernel that returns one. Default: PyTorch's SDPA for Ulysses; no ring."""
        if ring:
            raise ConfigError("parallel.ring_degree", "> 1", f"1 on {self.name}: use parallel.ulysses_degree")
        if self.cfg.attention not in ("auto", "sdpa"):
            raise ConfigError("backend.attention", self.cfg.attention, "auto or sdpa with parallel.ulysses_degree")
        return "native"

    # ---------------------------------------------------------------- memory

    # memory.quantization values this kind of device can run (quantization_methods() may narrow it by model).
    quantizations: tuple[str, ...] = memory_policy.QUANTIZATIONS
    # backend.attention kernels that take only bfloat16/float16 inputs.
    half_precision_kernels: tuple[str, ...] = ()
    # bitsandbytes' int8 dequant here: "fp16" (a fused kernel, then a cast) or "fp32" (its default kernels); the
    # planner counts its temporaries (contentv.planner.activations.bnb_int8_bytes_per_token).
    bnb_int8_dequant: str = "fp16"

    @classmethod
    def capabilities(cls) -> Capabilities:
        """This kind of device's capabilities, without building one (no device needed)."""
        return Capabilities(
            cls.name,
            cls.supports_offload_streams,
            cls.batched_guidance,
            cls.quantizations,
            cls.half_precision_kernels,
            cls.bnb_int8_dequant,
        )

    def check_attention(self, attention: str, dtype: str) -> None:
        """ConfigError if kernel `attention` can't take a model computing in `dtype` (before any weights load)."""
        check_kernel_dtype(self.name, self.half_precision_kernels, attention, dtype)

    def quantization_methods(self) -> tuple[str, ...]:
        """memory.quantization values this device can run."""
        return self.quantizations

    def check_memory(self, memory: MemoryConfig) -> None:
        """ConfigError if `memory` breaks the policy or needs what this backend lacks (before any weights move)."""
        memory_policy.check(memory, self)

    def prepare(self, pipe: Any, memory: MemoryConfig, spec: ModelSpec) -> dict:
        """Apply the memory strategy and attention kernel to a pipeline loaded on the CPU.

        Returns what was applied, for the run's record. `memory` was checked and decided when the run was resolved
        (contentv.resolve); the mechanisms still refuse a contradiction before anything moves (a direct caller).
        """
        self.check_memory(memory)
        memory = memory_policy.with_defaults(memory, spec.quantize_default)
        applied: dict = {"memory_preset": memory.name}
        applied["quantization"] = mem.quantize(pipe, memory, self)
        kernel = self.attention_kernel()
        applied["attention_kernel"] = self.kernel_name
        if memory.attention_slicing:
            kernel = sliced(kernel, memory.attention_slicing)
            applied["attention_kernel"] += f" (query chunks of {memory.attention_slicing})"
        spec.install_attention(pipe, kernel)
        applied.update(mem.vae_options(pipe, memory))
        applied["placement"] = mem.place(pipe, memory, self.device, streams=memory_policy.use_streams(memory, self))
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
        """Return cached blocks to the device, and cached pinned host memory to the OS (the runtime calls it when
        it drops a pipeline)."""

    def free_memory(self) -> int | None:
        """Bytes a new pipeline can use on the device (for memory=auto); None where unknown (CPU)."""
        return None

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """Whether `exc` is this device running out of memory (the runtime then frees it and may retry)."""
        return isinstance(exc, torch.OutOfMemoryError)
