"""Optional speed-ups, off by default: regional torch.compile and step caching (diffusers' cache hooks)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from contentv import _diffusers
from contentv.config import MemoryConfig, SpeedupConfig
from contentv.errors import ConfigError

if TYPE_CHECKING:  # torch and diffusers load with the pipeline, not with this module
    import torch
    from diffusers import DiffusionPipeline, ModelMixin
    from diffusers.hooks import ModelHook

log = logging.getLogger(__name__)
CACHES = ("none", "first_block")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The modes whose inductor options turn on CUDA graphs (torch._inductor.list_mode_options: "triton.cudagraphs").
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# Offload that gives the weights new storage on every forward: a CUDA graph replays the addresses it recorded
# (cudagraph trees re-record on a changed parameter address, then give up), so these can't work with one.
# model_cpu_offload moves the weights once per video, which only re-records once per video.
PER_CALL_OFFLOAD = ("group_offload", "sequential_cpu_offload")


def check(cfg: SpeedupConfig, memory: MemoryConfig | None = None) -> None:
    """ConfigError for a bad speed-up setting, or one that can't work with `memory` (None: not known yet)."""
    if cfg.cache not in CACHES:
        raise ConfigError("speedup.cache", cfg.cache, CACHES)
    if cfg.compile_mode not in COMPILE_MODES:
        raise ConfigError("speedup.compile_mode", cfg.compile_mode, COMPILE_MODES)
    if not cfg.cache_threshold > 0:
        raise ConfigError("speedup.cache_threshold", cfg.cache_threshold, "a number > 0 (e.g. 0.05)")
    if memory is not None and cfg.compile and cfg.compile_mode in CUDA_GRAPH_MODES:
        for flag in PER_CALL_OFFLOAD:
            if getattr(memory, flag):
                raise ConfigError(
                    "speedup.compile_mode",
                    cfg.compile_mode,
                    f"default or max-autotune-no-cudagraphs with memory.{flag} (a CUDA graph replays the weight "
                    "addresses it recorded; this offload gives the weights new storage on every forward)",
                )


def first_block_cache(denoiser: ModelMixin, threshold: float) -> None:
    """diffusers' FirstBlockCache, applied to every block but a final context-pre-only one.

    diffusers' own `apply_first_block_cache` fails on SD3-style models: their last block returns no
    text stream (None), which its tail hook subtracts from. So the cache here spans blocks 0..L-2 (via
    diffusers' hooks) and the final block always runs (1/38 of ContentV's compute).
    """
    from diffusers.hooks import FirstBlockCacheConfig, HookRegistry

    StateManager, FBCSharedBlockState, apply_head_hook, apply_block_hook = _diffusers.first_block_cache_parts()

    blocks = list(denoiser.transformer_blocks)
    if not getattr(blocks[-1], "context_pre_only", False):
        denoiser.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        return
    cached = blocks[:-1]
    if len(cached) < 2:
        raise ConfigError("speedup.cache", "first_block", "a model with at least 3 transformer blocks")
    state = StateManager(FBCSharedBlockState, (), {})
    apply_head_hook(cached[0], state, threshold)
    for block in cached[1:-1]:
        apply_block_hook(block, state)
    apply_block_hook(cached[-1], state, is_tail=True)
    HookRegistry.check_if_exists_or_initialize(denoiser).invalidate_child_registries_cache()


class SkipCounter:
    """Counts the transformer's forwards and those a step cache served from its cache (every block after the first
    skipped), as a forward hook; `reset()` before each video."""

    def __init__(self, head_hook: ModelHook) -> None:
        self.head = head_hook
        self.forwards = self.skipped = 0

    def __call__(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self.forwards += 1
        if not self.head.state_manager.get_state().should_compute:
            self.skipped += 1

    def reset(self) -> None:
        self.forwards = self.skipped = 0

    def record(self) -> dict:
        return {"forwards": self.forwards, "skipped": self.skipped}


def output_changes(cfg: SpeedupConfig) -> list[str]:
    """The speed-ups in `cfg` that change the output, each with what it changes (compilation runs the same math)."""
    if cfg.cache == "first_block":
        return [
            f"speedup.cache=first_block (steps whose first-block residual changes less than {cfg.cache_threshold} "
            "reuse cached residuals: frames change)"
        ]
    return []


def apply(pipe: DiffusionPipeline, cfg: SpeedupConfig) -> dict:
    """Apply the configured speed-ups to a prepared pipeline; returns what was applied."""
    check(cfg)
    applied = {}
    denoiser = pipe.transformer
    if cfg.cache == "first_block":
        # Skips the remaining blocks while the first block's residual barely changes between steps:
        # faster, slightly different output (quality trade-off set by cache_threshold).
        first_block_cache(denoiser, cfg.cache_threshold)
        applied["cache"] = f"first_block (threshold {cfg.cache_threshold})"
        # How many forwards the cache served, per video (the runtime resets and records it: sidecar "cache").
        pipe.cache_counter = SkipCounter(_diffusers.first_block_cache_head(denoiser))
        denoiser.register_forward_hook(pipe.cache_counter)
    if cfg.compile:
        # Regional compilation: each repeated transformer block compiles once and is reused.
        denoiser.compile_repeated_blocks(mode=cfg.compile_mode, fullgraph=False)
        applied["compile"] = f"repeated blocks, mode {cfg.compile_mode}"
    if applied:
        log.info("speed-ups: %s", applied)
    return applied
