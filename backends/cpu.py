"""CPU backend: everything on the host. Used for tests and tiny models.

Offload mechanisms run here too (onto and off the same device), which lets tests check that the
hooks are in place and that outputs are unchanged; they save no memory on a CPU.
"""

from __future__ import annotations

import os
import platform
from typing import TYPE_CHECKING

import torch

from backends.base import Backend
from contentv.attention import ForwardOp

if TYPE_CHECKING:
    from diffusers import ParallelConfig


class CPUBackend(Backend):
    name = "cpu"
    # Batching the two guidance passes gains nothing measurable on a CPU (within noise in
    # benchmarks/cpu_reference.py) and doubles activation memory: auto = sequential here.
    batched_guidance = False
    bnb_int8_dequant = "fp32"  # bitsandbytes' default int8 kernels dequantize in fp32 here

    @classmethod
    def detect(cls) -> str:
        return "no accelerator backend found its device"  # always there: auto's last resort

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

    def context_parallel_attention(self, dtype: torch.dtype, ring: bool) -> str | ForwardOp:
        # Ring attention merges by log-sum-exp; diffusers' own "_native_flash" op exists only for CUDA.
        return cpu_flash_forward_op if ring else Backend.context_parallel_attention(self, dtype, ring)


def cpu_flash_forward_op(
    ctx: torch.autograd.function.FunctionCtx,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    _save_ctx: bool = True,
    _parallel_config: ParallelConfig | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """diffusers forward-op signature over PyTorch's CPU flash attention, which also returns the log-sum-exp
    that ring attention merges by (diffusers' own "_native_flash" op exists only for CUDA). (B, S, H, D)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        dropout_p,
        is_causal,
        attn_mask=attn_mask,
        scale=scale,
    )  # (B, H, S, D), (B, H, S)
    out = out.transpose(1, 2)
    return (out, lse.transpose(1, 2)) if return_lse else out
