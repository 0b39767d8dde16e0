"""Memory mechanisms shared by every backend; each takes the backend's device explicitly.

The config states the intent (contentv.config.MemoryConfig); these functions apply diffusers',
accelerate's, bitsandbytes' and torchao's mechanisms. Device-specific gaps are decided by the backend
(e.g. `supports_offload_streams`, `quantization_methods`).
"""

from __future__ import annotations

import importlib.util
import logging

import torch
from torch import nn

from contentv.config import MemoryConfig
from contentv.errors import ConfigError

log = logging.getLogger(__name__)

TEXT_ENCODER_MODES = ("auto", "device", "release", "cpu", "offload")
QUANTIZATIONS = ("none", "bnb_int8", "bnb_nf4", "fp8", "torchao_int8")
CPU = torch.device("cpu")
# Layers kept in full precision when quantizing: tiny, precision-critical, or input/output projections.
QUANT_SKIP = ("proj_out", "norm_out", "time_text_embed", "pos_embed", "context_embedder", "norm", "shared")


def check(memory: MemoryConfig, backend) -> None:
    """Reject contradictory or unsupported combinations with one clear error."""
    if memory.model_cpu_offload and memory.sequential_cpu_offload:
        raise ConfigError(
            "memory.sequential_cpu_offload", True, "not together with memory.model_cpu_offload=true (pick one)"
        )
    if memory.group_offload and (memory.model_cpu_offload or memory.sequential_cpu_offload):
        which = "model_cpu_offload" if memory.model_cpu_offload else "sequential_cpu_offload"
        raise ConfigError("memory.group_offload", True, f"not together with memory.{which}=true (pick one)")
    if memory.group_offload_blocks < 1:
        raise ConfigError("memory.group_offload_blocks", memory.group_offload_blocks, "an integer >= 1")
    if memory.attention_slicing < 0:
        raise ConfigError("memory.attention_slicing", memory.attention_slicing, "0 (off) or a chunk size >= 1")
    if memory.text_encoders not in TEXT_ENCODER_MODES:
        raise ConfigError("memory.text_encoders", memory.text_encoders, TEXT_ENCODER_MODES)
    if memory.text_encoders in ("device", "release", "cpu") and (
        memory.model_cpu_offload or memory.sequential_cpu_offload
    ):
        raise ConfigError(
            "memory.text_encoders",
            memory.text_encoders,
            "auto or offload when model/sequential CPU offload is on (the offload hooks place the text encoders)",
        )
    if memory.text_encoders == "offload" and not (
        memory.group_offload or memory.model_cpu_offload or memory.sequential_cpu_offload
    ):
        raise ConfigError(
            "memory.text_encoders", "offload", "only with group_offload, model_cpu_offload or sequential_cpu_offload"
        )
    if memory.quantization not in QUANTIZATIONS:
        raise ConfigError("memory.quantization", memory.quantization, QUANTIZATIONS)
    methods = backend.quantization_methods()
    if memory.quantization != "none" and memory.quantization not in methods:
        others = [m for m in methods if m != "none"]
        raise ConfigError(
            "memory.quantization",
            memory.quantization,
            f"not available on backend {backend.name}; use one of: {', '.join(others) or 'none'}",
        )
    needs = {"bnb_int8": "bitsandbytes", "bnb_nf4": "bitsandbytes", "torchao_int8": "torchao"}
    package = needs.get(memory.quantization)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError("memory.quantization", memory.quantization, f"needs {package}: pip install '.[quant]'")
    if memory.quantization.startswith("bnb") and memory.sequential_cpu_offload:
        raise ConfigError(
            "memory.quantization", memory.quantization, "not with sequential_cpu_offload (bitsandbytes weights can't stream)"
        )


# ------------------------------------------------------------------------------------------ quantization


def _components(pipe, names: list[str]) -> dict[str, nn.Module]:
    out = {}
    for name in names:
        module = getattr(pipe, name, None)
        if not isinstance(module, nn.Module):
            raise ConfigError("memory.quantize", name, [k for k, v in pipe.components.items() if isinstance(v, nn.Module)])
        out[name] = module
    return out


def _quantizable(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and not any(part in QUANT_SKIP for part in name.split("."))


def _swap_linears(root: nn.Module, make) -> int:
    """Replace every quantizable nn.Linear under `root` by make(linear); returns how many."""
    targets = [(n, m) for n, m in root.named_modules() if _quantizable(n, m)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, make(linear))
    return len(targets)


def _bnb_int8(linear: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    q = bnb.nn.Linear8bitLt(
        linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False, threshold=6.0
    )
    q.weight = bnb.nn.Int8Params(linear.weight.data.contiguous(), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return q


def _bnb_nf4(linear: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    dtype = linear.weight.dtype if linear.weight.dtype != torch.float32 else torch.bfloat16
    q = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=dtype, quant_type="nf4"
    )
    q.weight = bnb.nn.Params4bit(linear.weight.data.contiguous(), requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return q


def quantize(pipe, memory: MemoryConfig, backend) -> str:
    """Quantize the chosen components' weights in place (on the CPU; bitsandbytes packs on first move)."""
    method = memory.quantization
    if method == "none":
        return "none"
    parts = _components(pipe, memory.quantize)
    for name, module in parts.items():
        if method in ("bnb_int8", "bnb_nf4"):
            n = _swap_linears(module, _bnb_int8 if method == "bnb_int8" else _bnb_nf4)
            module.to(backend.device)  # bitsandbytes quantizes when weights move to the device
        elif method == "fp8":
            # Weights stored in float8_e4m3fn, each layer upcast to its compute dtype when it runs.
            compute = next(module.parameters()).dtype
            if compute == torch.float32:
                compute = torch.bfloat16
                module.to(compute)
            if hasattr(module, "enable_layerwise_casting"):
                module.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute)
            else:
                from diffusers.hooks import apply_layerwise_casting

                apply_layerwise_casting(
                    module, storage_dtype=torch.float8_e4m3fn, compute_dtype=compute, skip_modules_pattern=QUANT_SKIP
                )
            n = sum(1 for _ in module.modules())
        else:  # torchao_int8
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            n = sum(1 for nm, m in module.named_modules() if _quantizable(nm, m))
            quantize_(module, Int8WeightOnlyConfig(), filter_fn=_quantizable)
        log.info("quantized %s with %s (%d layers)", name, method, n)
    return f"{method}: {', '.join(parts)}"


# ------------------------------------------------------------------------------------------ placement


def vae_options(pipe, memory: MemoryConfig) -> dict:
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        if memory.vae_slicing:
            vae.enable_slicing()
        if memory.vae_tiling:
            vae.enable_tiling()
    return {"vae_slicing": memory.vae_slicing, "vae_tiling": memory.vae_tiling}


def _text_encoders(pipe) -> dict[str, nn.Module]:
    return {k: v for k, v in pipe.components.items() if k.startswith("text_encoder") and isinstance(v, nn.Module)}


def place(pipe, memory: MemoryConfig, device: torch.device, streams: bool) -> str:
    """Put the pipeline on `device` by the configured placement; returns its name."""
    if memory.sequential_cpu_offload:
        pipe.enable_sequential_cpu_offload(device=device)
        return "sequential_cpu_offload"
    if memory.model_cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
        return "model_cpu_offload"
    keep_off = set(_text_encoders(pipe)) if text_encoder_mode(memory) in ("release", "cpu") else set()
    if memory.group_offload:
        use_stream = memory.group_offload_stream and streams
        if memory.group_offload_stream and not streams:
            log.info("group offload without streams: this backend has no offload streams")
        offloaded = ["transformer"] + (list(_text_encoders(pipe)) if memory.text_encoders == "offload" else [])
        for name, module in pipe.components.items():
            if not isinstance(module, nn.Module):
                continue
            if name in offloaded:
                module.enable_group_offload(
                    onload_device=device,
                    offload_device=CPU,
                    offload_type="block_level",
                    num_blocks_per_group=memory.group_offload_blocks,
                    use_stream=use_stream,
                    low_cpu_mem_usage=False,
                ) if hasattr(module, "enable_group_offload") else _group_offload_plain(
                    module, device, memory.group_offload_blocks, use_stream
                )
            elif name not in keep_off:
                module.to(device)
        pipe.execution_device = device
        return f"group_offload (blocks per group {memory.group_offload_blocks}, stream {use_stream})"
    for name, module in pipe.components.items():
        if isinstance(module, nn.Module) and name not in keep_off:
            module.to(device)
    pipe.execution_device = device
    return "device"


def _group_offload_plain(module: nn.Module, device: torch.device, blocks: int, use_stream: bool) -> None:
    from diffusers.hooks import apply_group_offloading

    apply_group_offloading(
        module,
        onload_device=device,
        offload_device=CPU,
        offload_type="block_level",
        num_blocks_per_group=blocks,
        use_stream=use_stream,
    )


def text_encoder_mode(memory: MemoryConfig) -> str:
    """auto -> offload under model/sequential offload, release under group offload, else device."""
    mode = memory.text_encoders
    if memory.model_cpu_offload or memory.sequential_cpu_offload:
        return "offload"
    if mode == "auto":
        return "release" if memory.group_offload else "device"
    return mode


def place_text_encoders(pipe, memory: MemoryConfig, device: torch.device) -> str:
    """Tell the pipeline where text encoding runs: resident, released after use, or on the CPU."""
    mode = text_encoder_mode(memory)
    pipe.text_encoder_placement = {"device": "resident", "release": "release", "cpu": "cpu", "offload": "resident"}[mode]
    return mode
