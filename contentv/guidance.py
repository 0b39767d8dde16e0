"""Classifier-free guidance, written once for every family: the passes a guided step runs and how they combine.

`batched` is one forward on the batch [uncond, cond] (diffusers' way; fills an accelerator, and halves the weight
traffic under offload); `sequential` is two forwards of batch 1 (half the activation memory; the reference's way).
Guidance parallelism (parallel.cfg_parallel) splits that same batch of two across two ranks with a hook on the
transformer (contentv/parallel/context.py), so it needs `batched` and nothing here changes for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# forward(latents, conditioning tensors, cache context) -> prediction; the context keeps a step cache's state
# (e.g. FirstBlockCache) apart per kind of pass.
Forward = Callable[[torch.Tensor, Sequence[torch.Tensor], str], torch.Tensor]


def predictions(
    forward: Forward,
    latents: torch.Tensor,
    cond: Sequence[torch.Tensor],
    uncond: Sequence[torch.Tensor] | None,
    mode: str,
    *,
    cond_first: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(unconditional, conditional) predictions for one step; unconditional is None without guidance.

    latents (B, ...); cond/uncond: the tensors the transformer is conditioned on, each (B, ...). `mode`: batched |
    sequential. `cond_first`: the order of the sequential passes (a family follows its reference).
    """
    if uncond is None:
        return None, forward(latents, cond, "cond")
    if mode == "batched":
        both = forward(
            torch.cat([latents, latents]), [torch.cat([u, c]) for u, c in zip(uncond, cond, strict=True)], "cond_uncond"
        )
        noise_uncond, noise_cond = both.chunk(2)
        return noise_uncond, noise_cond
    if cond_first:
        noise_cond = forward(latents, cond, "cond")
        return forward(latents, uncond, "uncond"), noise_cond
    noise_uncond = forward(latents, uncond, "uncond")
    return noise_uncond, forward(latents, cond, "cond")


def combine(noise_uncond: torch.Tensor, noise_cond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """The guided prediction: uncond + scale * (cond - uncond)."""
    return noise_uncond + scale * (noise_cond - noise_uncond)
