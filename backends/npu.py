"""Ascend NPU backend (torch_npu). Kernels: npu_fusion_attention (default), npu_fused_infer_attention_score, SDPA.

torch_npu is imported only inside this file's functions, so selecting another backend never imports it
(importing it needs the CANN toolkit). Never `torch_npu.contrib.transfer_to_npu`: it rewrites `torch.cuda`
for the whole process; the `npu` device is passed explicitly instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch

from backends.base import Backend
from contentv.attention import AttentionKernel, sdpa
from contentv.config import BackendConfig, MemoryConfig
from contentv.errors import ConfigError

# Fused attention takes fp16/bf16 (fp32 only on newer CANN); fp32 goes to SDPA.
FUSED_DTYPES = (torch.float16, torch.bfloat16)


def _import_torch_npu():
    """torch_npu, or a one-line ConfigError saying how to get it."""
    try:
        import torch_npu
    except ModuleNotFoundError as e:
        if e.name != "torch_npu":  # installed, but a dependency of it is missing
            raise _import_failed(e) from e
        raise ConfigError(
            "backend.name",
            "npu",
            "a backend with torch_npu installed: pip install torch-npu (the npu extra; needs the CANN toolkit), or use backend=cpu",
        ) from e
    except (ImportError, OSError, RuntimeError) as e:  # e.g. CANN libraries not found
        raise _import_failed(e) from e
    return torch_npu


# The reference's switch, read as a boolean: USE_ASCEND_NPU=false must not turn the NPU on.
ENV_TRUE = ("1", "true", "yes", "on")
ENV_FALSE = ("", "0", "false", "no", "off")


def use_ascend_npu() -> bool:
    """Whether USE_ASCEND_NPU asks for the NPU (backend=auto); a value that is neither yes nor no is one line
    naming the variable."""
    value = os.environ.get("USE_ASCEND_NPU", "")
    word = value.strip().lower()
    if word in ENV_TRUE:
        return True
    if word in ENV_FALSE:
        return False
    raise ConfigError(
        "USE_ASCEND_NPU", value, f"{'/'.join(ENV_TRUE)} for the NPU, or {'/'.join(ENV_FALSE[1:])} or unset"
    )


def _import_failed(e: Exception) -> ConfigError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ConfigError(
        "backend.name", "npu", f"a working torch_npu: importing it failed ({first}); source CANN's set_env.sh first"
    )


def npu_fusion_kernel(layout: str = "BNSD") -> AttentionKernel:
    """`torch_npu.npu_fusion_attention` as a (B, H, S, D) kernel, called in `layout` (BNSD or BSND)."""
    torch_npu = _import_torch_npu()

    def npu_fusion(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.dtype not in FUSED_DTYPES:
            return sdpa(q, k, v)
        heads, head_dim = q.shape[1], q.shape[-1]
        if layout == "BSND":
            q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # (B, S, N, D)
        # Dense and bidirectional: no mask (so the token band arguments are ignored). scale defaults to
        # 1.0 in torch_npu, so it is passed; everything after input_layout by keyword.
        out = torch_npu.npu_fusion_attention(
            q,
            k,
            v,
            heads,
            input_layout=layout,
            atten_mask=None,
            scale=1.0 / math.sqrt(head_dim),
            keep_prob=1.0,
        )[0]  # same layout as the input
        return out.transpose(1, 2) if layout == "BSND" else out  # (B, H, S, D)

    return npu_fusion


def npu_fused_infer_kernel() -> AttentionKernel:
    """`torch_npu.npu_fused_infer_attention_score` (the inference twin, graph-mode capable), BNSD."""
    torch_npu = _import_torch_npu()

    def npu_fused_infer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.dtype not in FUSED_DTYPES:
            return sdpa(q, k, v)
        heads, head_dim = q.shape[1], q.shape[-1]
        # It rejects non-contiguous input; num_heads defaults to 1 and scale to 1.0, so both are passed.
        return torch_npu.npu_fused_infer_attention_score(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            num_heads=heads,
            input_layout="BNSD",
            scale=1.0 / math.sqrt(head_dim),
        )[0]  # (B, H, S, D)

    return npu_fused_infer


# Layouts the fused-attention call is given.
NPU_LAYOUTS = ("BNSD", "BSND")


class NPUBackend(Backend):
    name = "npu"
    # diffusers 0.42.1's group offload prefetches on a side stream on any device whose torch module has Stream
    # (torch.npu.Stream); memory.group_offload_stream=false turns it off.
    supports_offload_streams = True
    # gloo beside HCCL: diffusers' uneven Ulysses exchanges split sizes as host tensors, so they don't sync the
    # device (with HCCL alone: four host syncs per attention call).
    process_group_backend = "cpu:gloo,npu:hccl"
    # bitsandbytes has no Ascend build; float8_e4m3fn storage (fp8) exists on Ascend 950 only (torch_npu's docs),
    # so fp8 is offered per device (quantization_methods), never for an unknown one.
    quantizations = ("none", "torchao_int8")
    FP8_DEVICES = ("950",)
    OPTIONS = {"layout": ("BNSD", NPU_LAYOUTS, "the layout npu_fusion_attention is given: BNSD or BSND")}

    def __init__(self, cfg: BackendConfig):
        self.check_options(cfg.options)  # a config error before importing torch_npu
        super().__init__(cfg)

    @classmethod
    def detect(cls) -> str | None:
        # The reference's switch; torch_npu is not imported to ask (it needs CANN).
        return f"USE_ASCEND_NPU={os.environ['USE_ASCEND_NPU']}" if use_ascend_npu() else None

    def _device(self) -> torch.device:
        _import_torch_npu()  # registers torch.npu and the "npu" device type
        if not torch.npu.is_available():
            raise ConfigError(
                "backend.name",
                "npu",
                "a backend whose device is visible: torch_npu sees no Ascend NPU (check npu-smi info and "
                "ASCEND_RT_VISIBLE_DEVICES; try cpu)"
                + (
                    f"; USE_ASCEND_NPU={os.environ['USE_ASCEND_NPU']} is set, so backend=auto picks npu: unset it"
                    if os.environ.get("USE_ASCEND_NPU", "").strip().lower() in ENV_TRUE
                    else ""
                ),
            )
        count = torch.npu.device_count()
        if not 0 <= self.cfg.device_index < count:
            raise ConfigError("backend.device_index", self.cfg.device_index, f"0..{count - 1} ({count} NPUs visible)")
        return torch.device("npu", self.cfg.device_index)

    def _setup(self) -> None:
        torch.npu.set_device(self.device)
        # The reference's process-wide settings: plain ND tensors (no private NZ formats), and the
        # precompiled operator binaries rather than online JIT compilation.
        torch.npu.config.allow_internal_format = False
        torch.npu.set_compile_mode(jit_compile=False)
        # backend.allow_tf32 ("faster fp32 math") is HF32 here; torch_npu turns it on for convolutions by default,
        # so without this the fp32 VAE would run in HF32 whatever the config says.
        torch.npu.matmul.allow_hf32 = self.cfg.allow_tf32
        torch.npu.conv.allow_hf32 = self.cfg.allow_tf32

    def describe(self) -> dict:
        torch_npu = _import_torch_npu()
        return {
            "backend": self.name,
            "device": str(self.device),
            "name": self.device_name(),
            "torch_npu": getattr(torch_npu, "__version__", "unknown"),
        }

    def kernels(self) -> dict[str, Callable[[], AttentionKernel]]:
        layout = self.options["layout"]
        return {
            "npu_fusion": lambda: npu_fusion_kernel(layout),
            "npu_fused_infer": npu_fused_infer_kernel,
            # torch_npu routes 4-D BNSD SDPA without a mask to its fused kernel on A2 and newer.
            "sdpa": lambda: sdpa,
        }

    def context_parallel_attention(self, dtype: torch.dtype, ring: bool) -> str:
        if ring:
            raise ConfigError(
                "parallel.ring_degree",
                "> 1",
                "1 on npu (diffusers 0.42's NPU attention returns no log-sum-exp, which ring attention needs): "
                "use parallel.ulysses_degree",
            )
        if dtype not in FUSED_DTYPES or self.cfg.attention == "sdpa":
            return "native"  # the fused kernel takes fp16/bf16 only (as the kernels here route fp32)
        if self.cfg.attention not in ("auto", "npu_fusion", "npu_fused_infer"):
            raise ConfigError(
                "backend.attention",
                self.cfg.attention,
                "with parallel.ulysses_degree: one of auto, npu_fusion, npu_fused_infer, sdpa",
            )
        return "_native_npu"

    def device_name(self) -> str:
        return torch.npu.get_device_name(self.device.index)

    def quantization_methods(self) -> tuple[str, ...]:
        if any(tag in self.device_name() for tag in self.FP8_DEVICES):
            return (*self.quantizations, "fp8")
        return self.quantizations

    def check_memory(self, memory: MemoryConfig) -> None:
        if memory.quantization == "fp8" and "fp8" not in self.quantization_methods():
            raise ConfigError(
                "memory.quantization",
                "fp8",
                f"not available on {self.device_name()} (float8 storage needs an Ascend 950); use torchao_int8 or none",
            )
        super().check_memory(memory)

    def is_out_of_memory(self, exc: BaseException) -> bool:
        # torch_npu's allocator raises torch.OutOfMemoryError; older releases a RuntimeError with this text.
        return super().is_out_of_memory(exc) or (isinstance(exc, RuntimeError) and "NPU out of memory" in str(exc))

    def synchronize(self) -> None:
        torch.npu.synchronize(self.device)

    def reset_peak_memory(self) -> None:
        torch.npu.reset_peak_memory_stats(self.device)

    def peak_memory(self) -> int:
        return torch.npu.max_memory_allocated(self.device)

    def empty_cache(self) -> None:
        torch.npu.empty_cache()
        # The pinned host cache (group offload with streams pins every weight): torch_npu's own host allocator,
        # aligned with CUDA's since torch_npu 2.8 (power-of-two blocks), emptied by its own call; older releases
        # name it empty_pin_memory_cache. Not torch.accelerator.empty_host_cache(): no host allocator is
        # registered with torch for this device type.
        release = getattr(torch.npu, "host_empty_cache", None) or getattr(torch.npu, "empty_pin_memory_cache", None)
        if release is not None:
            release()

    def free_memory(self) -> int:
        free, _ = torch.npu.mem_get_info(self.device)
        return free + torch.npu.memory_reserved(self.device)
