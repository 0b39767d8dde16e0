"""Optional speed-ups, off by default: regional torch.compile and step caching (diffusers' cache hooks)."""

from __future__ import annotations

import logging

from contentv.config import SpeedupConfig
from contentv.errors import ConfigError

log = logging.getLogger(__name__)
CACHES = ("none", "first_block")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check(cfg: SpeedupConfig) -> None:
    if cfg.cache not in CACHES:
        raise ConfigError("speedup.cache", cfg.cache, CACHES)
    if cfg.compile_mode not in COMPILE_MODES:
        raise ConfigError("speedup.compile_mode", cfg.compile_mode, COMPILE_MODES)
    if not cfg.cache_threshold > 0:
        raise ConfigError("speedup.cache_threshold", cfg.cache_threshold, "a number > 0 (e.g. 0.05)")


def apply(pipe, cfg: SpeedupConfig) -> dict:
    """Apply the configured speed-ups to a prepared pipeline; returns what was applied."""
    check(cfg)
    applied = {}
    denoiser = pipe.transformer
    if cfg.cache == "first_block":
        # Skips the remaining blocks while the first block's residual barely changes between steps:
        # faster, slightly different output (quality trade-off set by cache_threshold).
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        apply_first_block_cache(denoiser, FirstBlockCacheConfig(threshold=cfg.cache_threshold))
        applied["cache"] = f"first_block (threshold {cfg.cache_threshold})"
    if cfg.compile:
        # Regional compilation: each repeated transformer block compiles once and is reused.
        denoiser.compile_repeated_blocks(mode=cfg.compile_mode, fullgraph=False)
        applied["compile"] = f"repeated blocks, mode {cfg.compile_mode}"
    if applied:
        log.info("speed-ups: %s", applied)
    return applied
