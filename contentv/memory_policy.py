"""Memory policy: what each `memory.*` setting means, which combinations are allowed, and what they cost.

One home for the rules that the backends (mechanisms), the planner (predictions), the runtime and the web
page all follow. Nothing here touches a device: a backend passes its capabilities in (`Capabilities`),
and `backends/memory.py` applies the mechanisms these rules describe.

Adding a memory strategy: a `conf/memory/<name>.yaml` preset when it combines existing settings (one file);
a new mechanism adds its setting here (name, rules, what it changes), its mechanism in `backends/memory.py`
and its bytes in `contentv/planner/` (three files).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from contentv.config import MemoryConfig
from contentv.errors import ConfigError
from contentv.extras import install_hint

if TYPE_CHECKING:  # torch only where a module is looked at: pre-flight checks stay light
    from torch import nn

# ------------------------------------------------------------------------------------------ names

# Where the weights live while generating (at most one of the three offload switches is on).
PLACEMENTS = ("device", "model_cpu_offload", "group_offload", "sequential_cpu_offload")
OFFLOAD_FLAGS = ("model_cpu_offload", "group_offload", "sequential_cpu_offload")
TEXT_ENCODER_MODES = ("auto", "device", "release", "cpu", "offload")
# How the guided pipeline runs its two passes per step (the pipelines take one of these), and the setting.
PIPELINE_GUIDANCE_MODES = ("batched", "sequential")
GUIDANCE_MODES = ("auto", *PIPELINE_GUIDANCE_MODES)
QUANTIZATIONS = ("none", "bnb_int8", "bnb_nf4", "fp8", "torchao_int8")
# The Python package each quantization needs (imported only when that quantization is selected) and its lowest
# working version: bitsandbytes before 0.48 keeps each layer's int8 copy on the GPU after quantizing (~12.8 GB for
# ContentV-8B) and re-quantizes on every onload; torchao 0.10 is the first with Int8WeightOnlyConfig.
QUANTIZATION_PACKAGES = {
    "bnb_int8": ("bitsandbytes", "0.48"),
    "bnb_nf4": ("bitsandbytes", "0.48"),
    "torchao_int8": ("torchao", "0.10"),
}

# Layers kept in full precision when quantizing: tiny, precision-critical, or input/output projections.
# bnb/torchao skip a Linear when any dotted part of its name is listed (as transformers'
# `modules_to_not_convert`); fp8 adds them as regexes to diffusers' layerwise-casting defaults. Each
# component's `_keep_in_fp32_modules` (T5: "wo") is added (`skip_parts`).
QUANT_SKIP = ("proj_out", "norm_out", "time_text_embed", "pos_embed", "context_embedder", "norm", "shared")


class Capabilities(Protocol):
    """What a backend tells the policy about its device (backends.Backend has these members)."""

    name: str
    supports_offload_streams: bool

    def quantization_methods(self) -> tuple[str, ...]: ...


# ------------------------------------------------------------------------------------------ derived settings


def placement(memory: MemoryConfig) -> str:
    """The placement mechanism: one of PLACEMENTS."""
    for flag in ("sequential_cpu_offload", "model_cpu_offload", "group_offload"):
        if getattr(memory, flag):
            return flag
    return "device"


def text_encoder_mode(memory: MemoryConfig) -> str:
    """auto -> offload under model/sequential offload (the hooks place them), release under group offload,
    else device (resident). An explicit choice stands (check() rejects the ones offload hooks override)."""
    if memory.model_cpu_offload or memory.sequential_cpu_offload:
        return "offload"
    if memory.text_encoders == "auto":
        return "release" if memory.group_offload else "device"
    return memory.text_encoders


def guidance_mode(memory: MemoryConfig, batched_by_default: bool = True) -> str:
    """auto -> the backend's preference: batched on accelerators (one batch-2 forward per step fills the
    device better and halves weight traffic under offload), sequential on the CPU (no gain from batching
    there, measured by benchmarks/cpu_reference.py). Presets for small cards choose sequential explicitly."""
    if memory.guidance_mode not in GUIDANCE_MODES:
        raise ConfigError("memory.guidance_mode", memory.guidance_mode, GUIDANCE_MODES)
    if memory.guidance_mode == "auto":
        return "batched" if batched_by_default else "sequential"
    return memory.guidance_mode


def guidance_passes(memory: MemoryConfig, guidance_scale: float | None, batched_by_default: bool = True) -> str:
    """batched | sequential | none: what the denoising loop runs (guidance_scale <= 1 is one pass)."""
    if (guidance_scale or 0) <= 1:
        return "none"
    return guidance_mode(memory, batched_by_default)


# Group offload with streams frees each onloaded group with `record_stream`: its device memory stays reserved until
# the compute stream has used it, while the host, waiting only for copies, can run ahead of compute by many groups.
# The backends make the host wait once it is this many groups ahead (backends/memory.py, bound_run_ahead), so at
# most this many freed groups are still reserved beside the running and the prefetched one; the planner counts them.
GROUP_OFFLOAD_RUN_AHEAD = 2


def use_streams(memory: MemoryConfig, caps: Capabilities) -> bool:
    """Group offload prefetches on a side stream when asked and the device has offload streams."""
    return bool(memory.group_offload and memory.group_offload_stream and caps.supports_offload_streams)


def with_defaults(memory: MemoryConfig, quantize_default: Iterable[str]) -> MemoryConfig:
    """memory.quantize=null -> the model family's default components."""
    if memory.quantize is not None:
        return memory
    return dataclasses.replace(memory, quantize=list(quantize_default))


def output_changes(memory: MemoryConfig) -> list[str]:
    """The settings in `memory` that change the output (frames differ from everything resident), each with
    what it changes. Offload, slicing of the VAE batch and attention slicing leave it unchanged."""
    out = []
    if memory.quantization != "none":
        out.append(f"quantization={memory.quantization} (weights rounded: every frame changes slightly)")
    if memory.vae_tiling:
        out.append("vae_tiling (frames decoded in blended tiles: pixels near tile seams change; latents don't)")
    elif memory.vae_tiling is None:
        out.append("vae_tiling where the untiled decode wouldn't fit (then pixels near tile seams change)")
    return out


# ------------------------------------------------------------------------------------------ checks


def check(memory: MemoryConfig, caps: Capabilities | None = None) -> None:
    """Reject contradictory or unsupported settings with one ConfigError line, before any weights move.

    Without `caps`, only the device-independent rules; with them, also what this backend can run.
    """
    _check_values(memory)
    _check_combinations(memory)
    if caps is not None:
        _check_capabilities(memory, caps)


def _check_values(memory: MemoryConfig) -> None:
    for flag in (*OFFLOAD_FLAGS, "group_offload_stream", "vae_slicing"):
        if not isinstance(getattr(memory, flag), bool):
            raise ConfigError(f"memory.{flag}", getattr(memory, flag), "true or false")
    if memory.vae_tiling is not None and not isinstance(memory.vae_tiling, bool):
        raise ConfigError("memory.vae_tiling", memory.vae_tiling, "true, false or null (only where needed)")
    if not _is_int(memory.group_offload_blocks) or memory.group_offload_blocks < 1:
        raise ConfigError("memory.group_offload_blocks", memory.group_offload_blocks, "an integer >= 1")
    if not _is_int(memory.attention_slicing) or memory.attention_slicing < 0:
        raise ConfigError("memory.attention_slicing", memory.attention_slicing, "0 (off) or a chunk size >= 1")
    if memory.guidance_mode not in GUIDANCE_MODES:
        raise ConfigError("memory.guidance_mode", memory.guidance_mode, GUIDANCE_MODES)
    if memory.text_encoders not in TEXT_ENCODER_MODES:
        raise ConfigError("memory.text_encoders", memory.text_encoders, TEXT_ENCODER_MODES)
    if memory.quantization not in QUANTIZATIONS:
        raise ConfigError("memory.quantization", memory.quantization, QUANTIZATIONS)
    if memory.quantize is not None and (
        not isinstance(memory.quantize, (list, tuple)) or not all(isinstance(n, str) for n in memory.quantize)
    ):
        raise ConfigError("memory.quantize", memory.quantize, "null (the model's default) or a list of component names")
    if memory.budget_gb is not None:
        b = memory.budget_gb
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < 1e6 or b != b:
            raise ConfigError("memory.budget_gb", b, "null (the device's free memory) or a number of GB > 0")


def _check_combinations(memory: MemoryConfig) -> None:
    on = [f for f in OFFLOAD_FLAGS if getattr(memory, f)]
    if len(on) > 1:
        raise ConfigError(f"memory.{on[1]}", True, f"not together with memory.{on[0]}=true (pick one placement)")
    if memory.text_encoders in ("device", "release", "cpu") and (
        memory.model_cpu_offload or memory.sequential_cpu_offload
    ):
        raise ConfigError(
            "memory.text_encoders",
            memory.text_encoders,
            "auto or offload when model/sequential CPU offload is on (the offload hooks place the text encoders)",
        )
    if memory.text_encoders == "offload" and not on:
        raise ConfigError(
            "memory.text_encoders", "offload", "only with group_offload, model_cpu_offload or sequential_cpu_offload"
        )
    if memory.quantization.startswith("bnb") and memory.sequential_cpu_offload:
        # accelerate's per-layer hooks rebuild each weight from a plain copy on every call; bitsandbytes' 4-bit
        # quant state does not survive it (fails on the CPU too) and its int8 path there assumes its own classes.
        raise ConfigError(
            "memory.quantization",
            memory.quantization,
            "fp8 or torchao_int8 with sequential_cpu_offload (or bitsandbytes with group_offload or model_cpu_offload)",
        )


def _check_capabilities(memory: MemoryConfig, caps: Capabilities) -> None:
    if use_streams(memory, caps) and memory.group_offload_blocks != 1:
        # diffusers would silently reset it to 1: it prefetches exactly one block ahead on the side stream.
        raise ConfigError(
            "memory.group_offload_blocks",
            memory.group_offload_blocks,
            "1 when memory.group_offload_stream=true (or set group_offload_stream=false)",
        )
    methods = caps.quantization_methods()
    if memory.quantization != "none" and memory.quantization not in methods:
        others = [m for m in methods if m != "none"]
        raise ConfigError(
            "memory.quantization",
            memory.quantization,
            f"not available on backend {caps.name}; use one of: {', '.join(others) or 'none'}",
        )
    if memory.quantization in QUANTIZATION_PACKAGES:
        package, lowest = QUANTIZATION_PACKAGES[memory.quantization]
        installed = _installed_version(package)
        if installed is None:
            raise ConfigError("memory.quantization", memory.quantization, f"needs {package}: {install_hint('quant')}")
        if _version_tuple(installed) < _version_tuple(lowest):
            raise ConfigError(
                "memory.quantization",
                memory.quantization,
                f"{package} >= {lowest} ({installed} is installed): pip install -U '{package}>={lowest}'",
            )


def check_components(memory: MemoryConfig, components: Iterable[str]) -> None:
    """memory.quantize names only the model's weight-bearing components."""
    names = tuple(components)
    for name in memory.quantize or ():
        if name not in names:
            raise ConfigError("memory.quantize", name, names)


def _installed_version(package: str) -> str | None:
    """The installed distribution's version, without importing it (None if absent)."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec(package) is None:
        return None
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "0"


def _version_tuple(version: str) -> tuple[int, ...]:
    """(0, 48, 1) from "0.48.1.dev0"; enough for minimum-version checks."""
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------ quantization rules


def skip_parts(module: nn.Module) -> tuple[str, ...]:
    """Name parts whose Linear layers stay unquantized in `module`: QUANT_SKIP and its fp32-kept modules."""
    return QUANT_SKIP + tuple(getattr(module, "_keep_in_fp32_modules", None) or ())


def quantizable(name: str, module: nn.Module, skip: tuple[str, ...] = QUANT_SKIP) -> bool:
    """bnb/torchao quantize plain nn.Linear layers none of whose dotted name parts is in `skip`."""
    from torch import nn

    return type(module) is nn.Linear and not any(part in skip for part in name.split("."))


def fp8_skip_classes() -> tuple[type[nn.Module], ...]:
    """Layer classes fp8 layerwise casting leaves alone: T5's tied `shared`/`embed_tokens` (embeddings) would turn
    the text encoder's `.dtype` (which prompt encoding casts to) into float8."""
    from torch import nn

    return (nn.Embedding,)


def fp8_skip_patterns(module: nn.Module) -> tuple[str, ...]:
    """Module-name regexes fp8 layerwise casting leaves in the compute dtype: diffusers' defaults + skip_parts.

    (Layers of FP8_SKIP_CLASSES are skipped as well; diffusers models add their own class patterns.)
    """
    from contentv._diffusers import layerwise_casting_defaults

    return tuple(dict.fromkeys(layerwise_casting_defaults() + skip_parts(module)))
