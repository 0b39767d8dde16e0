"""Weight bytes: every tensor of a component counted at the dtype it is loaded in, after quantization.

Components are built on the meta device (no weights read) by the model family's description
(`contentv/models/<family>/architecture.py`); the counts follow the loaders' and quantizers' own rules, so
they equal the loaded bytes exactly (tests compare with loaded tiny checkpoints, every dtype and method).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from contentv._diffusers import group_offload_layer_types
from contentv.errors import ConfigError
from contentv.memory_policy import QUANTIZATIONS, fp8_skip_classes, fp8_skip_patterns, quantizable, skip_parts


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for t in tensors:
        seen.setdefault(id(t), t)
    return list(seen.values())


def _is_transformers(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.") or any(
        c.__module__.startswith("transformers.modeling_utils") for c in type(module).__mro__
    )


def _keep_fp32(module: nn.Module, dtype: torch.dtype) -> Callable[[str], bool]:
    """Whether a state-dict entry stays float32 when the component loads in `dtype` (the loaders' rules)."""
    if _is_transformers(module):
        # transformers: _keep_in_fp32_modules for fp16 only; the _strict list for fp16 and bf16; glob search.
        names = set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
        if dtype == torch.float16:
            names |= set(getattr(module, "_keep_in_fp32_modules", None) or ())
        patterns = [re.compile(re.escape(n).replace(r"\*", ".*")) for n in names]
        return lambda key: dtype != torch.float32 and any(p.search(key) for p in patterns)
    # diffusers: _keep_in_fp32_modules for any dtype, matched against dotted name parts.
    names = set(getattr(type(module), "_keep_in_fp32_modules", None) or ())
    return lambda key: any(n in key.split(".") for n in names)


def _fp8_layers(module: nn.Module) -> list[nn.Module]:
    """Layers diffusers' layerwise casting stores in fp8, with backends/memory.py's skip patterns."""
    patterns = fp8_skip_patterns(module)
    if hasattr(module, "enable_layerwise_casting"):  # ModelMixin adds its class patterns
        patterns += tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
        patterns += tuple(getattr(module, "_skip_layerwise_casting_patterns", None) or ())
    layers = group_offload_layer_types()
    skip_classes = fp8_skip_classes()
    found: list[nn.Module] = []

    def walk(m: nn.Module, prefix: str) -> None:
        if isinstance(m, skip_classes) or any(re.search(p, prefix) for p in patterns):
            return
        if isinstance(m, layers):
            found.append(m)
            return
        for name, child in m.named_children():
            walk(child, f"{prefix}.{name}" if prefix else name)

    walk(module, "")
    return found


def _nf4_bytes(numel: int) -> int:
    # bitsandbytes Params4bit (blocksize 64, compress_statistics=True): packed 4-bit data, uint8 absmax per
    # block, its fp32 absmax per 256 blocks, the 256-entry fp32 code of the nested state, the 16-entry NF4
    # code and an fp32 offset. The state's tensors travel with the layer (one copy per layer on the device).
    blocks = math.ceil(numel / 64)
    return (numel + 1) // 2 + blocks + math.ceil(blocks / 256) * 4 + 256 * 4 + 16 * 4 + 4


# Quantization method -> bytes of a quantized Linear weight of `rows` rows and `n` elements, scales included.
_QUANTIZED_WEIGHT_BYTES: dict[str, Callable[[int, int], int]] = {
    "bnb_int8": lambda rows, n: n + rows * 4,  # int8 rows + fp32 row scales (SCB)
    "bnb_nf4": lambda rows, n: _nf4_bytes(n),
    # torchao Int8Tensor: int8 data, fp32 row scale, int8 zero point
    "torchao_int8": lambda rows, n: n + rows * 4 + rows,
}


def tensor_bytes(module: nn.Module, dtype: torch.dtype, quantization: str = "none") -> dict[int, int]:
    """id(tensor) -> bytes it takes once loaded in `dtype` and quantized; one entry per unique tensor.

    Parameters and persistent buffers: floating ones in `dtype` (float32 where the loader keeps them so),
    others as built. Non-persistent buffers: as built (loaders don't cast them). A quantized Linear's
    weight entry also holds its scales (bnb int8: fp32 row scales; nf4: absmax and codes; torchao int8:
    fp32 row scale and int8 zero point).
    """
    keep = _keep_fp32(module, dtype)
    out: dict[int, int] = {}
    persistent = module.state_dict(keep_vars=True)
    for key, t in persistent.items():
        if id(t) in out:
            continue
        want = (torch.float32 if keep(key) else dtype) if t.is_floating_point() else t.dtype
        out[id(t)] = t.numel() * want.itemsize
    for t in module.buffers():
        out.setdefault(id(t), t.numel() * t.dtype.itemsize)
    if quantization == "none":
        return out
    if quantization == "fp8":
        for layer in _fp8_layers(module):
            for t in [*layer.parameters(), *layer.buffers()]:
                if t.is_floating_point():
                    out[id(t)] = t.numel()  # float8_e4m3fn: 1 byte
        return out
    skip = skip_parts(module)
    for name, m in module.named_modules():
        if not quantizable(name, m, skip):
            continue
        w = m.weight
        size = _QUANTIZED_WEIGHT_BYTES.get(quantization)
        if size is None:
            raise ConfigError("memory.quantization", quantization, QUANTIZATIONS)
        out[id(w)] = size(w.shape[0], w.numel())
    return out


def host_allocation(nbytes: int) -> int:
    """Bytes torch's caching host allocator takes to pin a tensor of `nbytes`: the next power of two
    (CachingHostAllocator.h, `c10::llvm::PowerOf2Ceil`, in torch 2.x CUDA builds and torch_npu; torch 2.13's
    `pinned_max_round_threshold` is unset by default, i.e. every size is rounded)."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


# Quantization method -> the separately pinned tensors of a quantized Linear weight (diffusers pins each parameter
# and buffer on its own; a tensor subclass pins each inner tensor).
_PINNED_PARTS: dict[str, Callable[[int, int], tuple[int, ...]]] = {
    "bnb_int8": lambda rows, n: (n, rows * 4),  # Int8Params; the fp32 row scales are the `weight_scale` buffer
    "bnb_nf4": lambda rows, n: ((n + 1) // 2,),  # Params4bit; its quant state is no parameter: not pinned
    "torchao_int8": lambda rows, n: (n, rows * 4, rows),  # qdata, scale, zero point
}


def pinned_bytes(module: nn.Module, dtype: torch.dtype, quantization: str = "none") -> int:
    """Host bytes of the pinned copies diffusers' group offload with streams makes of `module` (one `pin_memory()`
    per parameter and buffer, each rounded up by the allocator), plus what stays unpinned (nf4's state)."""
    sizes = tensor_bytes(module, dtype, quantization)
    parts = {key: (n,) for key, n in sizes.items()}
    if quantization in _PINNED_PARTS:
        skip = skip_parts(module)
        for name, m in module.named_modules():
            if quantizable(name, m, skip):
                parts[id(m.weight)] = _PINNED_PARTS[quantization](m.weight.shape[0], m.weight.numel())
    return sum(sum(map(host_allocation, p)) + sizes[key] - sum(p) for key, p in parts.items())


def weight_bytes(module: nn.Module, dtype: torch.dtype, quantization: str = "none") -> int:
    """Exact bytes of one component's parameters and buffers once loaded in `dtype` and quantized."""
    return sum(tensor_bytes(module, dtype, quantization).values())


def _sum(module: nn.Module, sizes: dict[int, int], recurse: bool = True) -> int:
    tensors = _unique([*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)])
    return sum(sizes.get(id(t), 0) for t in tensors)


def block_groups(module: nn.Module, sizes: dict[int, int], per_group: int) -> tuple[int, int]:
    """diffusers block-level group offload: (largest group of `per_group` blocks, the rest of the model)."""
    groups, in_groups = [], 0
    for child in module.children():
        if isinstance(child, (nn.ModuleList, nn.Sequential)):
            for i in range(0, len(child), per_group):
                groups.append(sum(_sum(b, sizes) for b in child[i : i + per_group]))
            in_groups += sum(_sum(b, sizes) for b in child)
    return max(groups, default=0), sum(sizes.values()) - in_groups


def leaf_groups(module: nn.Module, sizes: dict[int, int]) -> tuple[int, int]:
    """diffusers leaf-level group offload: (largest leaf layer, weights outside leaf layers)."""
    layers = group_offload_layer_types()
    leaves = [m for m in module.modules() if isinstance(m, layers)]
    largest = max((_sum(m, sizes) for m in leaves), default=0)
    in_leaves = sum(sizes.get(id(t), 0) for t in _unique(t for m in leaves for t in [*m.parameters(), *m.buffers()]))
    return largest, sum(sizes.values()) - in_leaves


def largest_direct(module: nn.Module, sizes: dict[int, int]) -> int:
    """accelerate's sequential offload moves each module's own parameters when it runs: the largest set."""
    return max((_sum(m, sizes, recurse=False) for m in module.modules()), default=0)


def sum_buffers(module: nn.Module, sizes: dict[int, int]) -> int:
    """accelerate's sequential offload keeps buffers on the device (offload_buffers=False)."""
    return sum(sizes.get(id(t), 0) for t in _unique(module.buffers()))
