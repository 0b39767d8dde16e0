"""Attention kernels: the one seam through which a backend decides how attention is computed.

A kernel is `(q, k, v) -> out` on (B, H, S, D) tensors (the BNSD layout), dense and bidirectional
(DiT attention has no mask). Model code calls the kernel it was given and never looks at the device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

AttentionKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# Under context parallelism: a forward op of diffusers' signature, (ctx, q, k, v, ..., return_lse) -> out or
# (out, lse), on (B, S, H, D) tensors (see contentv.parallel.context.context_parallel_kernel).
ForwardOp = Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch scaled-dot-product attention; (B, H, S, D) in and out."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)


def sliced(kernel: AttentionKernel, chunk_size: int) -> AttentionKernel:
    """Run `kernel` over query chunks of `chunk_size` tokens: same result, smaller attention peak.

    Each query row attends to all keys independently, so chunking queries is exact.
    """
    if chunk_size < 1:
        raise ValueError(f"attention chunk_size must be >= 1, got {chunk_size}")

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = q.shape[2]
        if s <= chunk_size:
            return kernel(q, k, v)
        out = torch.empty_like(q)  # (B, H, S, D)
        for start in range(0, s, chunk_size):
            out[:, :, start : start + chunk_size] = kernel(q[:, :, start : start + chunk_size], k, v)
        return out

    run.__name__ = f"sliced_{getattr(kernel, '__name__', 'kernel')}_{chunk_size}"
    return run
