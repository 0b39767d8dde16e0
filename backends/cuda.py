"""CUDA backend: NVIDIA GPUs. Kernels: PyTorch SDPA (default), flash-attn and SageAttention when installed."""

from __future__ import annotations

from collections.abc import Callable

import torch

from backends.base import HALF, Backend, empty_host_cache
from contentv import _diffusers
from contentv.attention import AttentionKernel, sdpa
from contentv.errors import ConfigError

# Kernels reached through diffusers' attention dispatch: our name -> (dispatch backend, where to get it).
DISPATCH = {
    "flash": ("flash", "pip install 'flash-attn>=2.6.3'"),
    "flash3": ("_flash_3", "build flash-attention 3 from source (github.com/Dao-AILab/flash-attention, hopper/)"),
    # PyPI's sageattention stops at 1.x; diffusers needs >= 2.1.1.
    "sage": ("sage", "build SageAttention >= 2.1.1 from source (github.com/thu-ml/SageAttention)"),
}


def _dispatched(backend_name: str) -> AttentionKernel:
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # dispatch takes (B, S, H, D); our kernels take and return (B, H, S, D)
        out = dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend=backend_name)
        return out.transpose(1, 2)

    run.__name__ = backend_name
    return run


def _kernel(name: str) -> Callable[[], AttentionKernel]:
    """A factory for a dispatched kernel: its check runs when it is chosen (ConfigError if diffusers can't use it)."""
    dispatch_name, hint = DISPATCH[name]

    def make() -> AttentionKernel:
        problem = _diffusers.attention_backend_problem(dispatch_name)
        if problem:
            raise ConfigError("backend.attention", name, f"a usable kernel: {first_line_of(problem)} ({hint})")
        return _dispatched(dispatch_name)

    return make


def first_line_of(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


# Context parallelism: which diffusers attention backend computes the local attention, per backend.attention.
ULYSSES_ATTENTION = {"auto": "native", "sdpa": "native", "flash": "flash", "sage": "sage"}
# Ring attention merges partial results by their log-sum-exp, so it needs a kernel that returns it.
RING_ATTENTION = {"auto": "_native_cudnn", "sdpa": "_native_cudnn", "flash": "flash", "sage": "sage"}


class CUDABackend(Backend):
    name = "cuda"
    supports_offload_streams = True
    process_group_backend = "cpu:gloo,cuda:nccl"
    half_precision_kernels = tuple(DISPATCH)  # flash-attn 2/3 and SageAttention take 16-bit inputs only

    @classmethod
    def detect(cls) -> str | None:
        return "a CUDA GPU is visible" if torch.cuda.is_available() else None

    def _device(self) -> torch.device:
        if not torch.cuda.is_available():
            raise ConfigError("backend.name", "cuda", "a backend whose device is visible: no CUDA GPU here (try cpu)")
        count = torch.cuda.device_count()
        if not 0 <= self.cfg.device_index < count:
            raise ConfigError("backend.device_index", self.cfg.device_index, f"0..{count - 1} ({count} GPUs visible)")
        return torch.device("cuda", self.cfg.device_index)

    def _setup(self) -> None:
        torch.cuda.set_device(self.device)
        torch.backends.cuda.matmul.allow_tf32 = self.cfg.allow_tf32
        torch.backends.cudnn.allow_tf32 = self.cfg.allow_tf32

    def describe(self) -> dict:
        props = torch.cuda.get_device_properties(self.device)
        return {
            "backend": self.name,
            "device": str(self.device),
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "total_memory_bytes": props.total_memory,
            "cuda": torch.version.cuda,
        }

    def kernels(self) -> dict[str, Callable[[], AttentionKernel]]:
        return {"sdpa": lambda: sdpa, **{name: _kernel(name) for name in DISPATCH}}

    def context_parallel_attention(self, dtype: torch.dtype, ring: bool) -> str:
        table = RING_ATTENTION if ring else ULYSSES_ATTENTION
        option = "parallel.ring_degree" if ring else "parallel.ulysses_degree"
        if self.cfg.attention not in table:
            raise ConfigError("backend.attention", self.cfg.attention, f"with {option}: one of {', '.join(table)}")
        if self.cfg.attention in DISPATCH:
            _kernel(self.cfg.attention)()  # the kernel must be usable here (ConfigError with the fix)
        if ring and dtype not in HALF:
            raise ConfigError(
                "model.dtype",
                str(dtype).removeprefix("torch."),
                "bfloat16 or float16 with parallel.ring_degree on cuda (its log-sum-exp kernels are 16-bit); "
                "or use parallel.ulysses_degree",
            )
        return table[self.cfg.attention]

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()
        empty_host_cache()

    def free_memory(self) -> int:
        # free + what our own caching allocator holds: a sweep's later jobs plan like the first
        free, _ = torch.cuda.mem_get_info(self.device)
        return free + torch.cuda.memory_reserved(self.device)
