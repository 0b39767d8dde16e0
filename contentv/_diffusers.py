"""Every private diffusers API this runtime uses, behind one small adapter.

Why the pin: pyproject.toml requires `diffusers>=0.42,<0.43`. The names below are underscore names or live in
modules diffusers does not export (`diffusers.models._modeling_parallel`, `diffusers.hooks.context_parallel`,
`diffusers.hooks.first_block_cache` internals, `diffusers.hooks._common`), so any minor release may rename or
change them. Upgrading diffusers = re-checking this file (tests/test_diffusers_adapter.py imports every name)
and then moving the cap. Nothing else in contentv/ or backends/ may import them (a test enforces it).

Each accessor imports lazily: importing this module costs nothing until a feature is used.
"""

from __future__ import annotations

from typing import Any

import torch

# The diffusers minor series the names below were checked against.
CHECKED_SERIES = "0.42"


def group_offload_layer_types() -> tuple[type[torch.nn.Module], ...]:
    """Layer classes diffusers' leaf-level group offloading and layerwise casting act on (Linear, Conv, ...)."""
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    return tuple(_GO_LC_SUPPORTED_PYTORCH_LAYERS)


def layerwise_casting_defaults() -> tuple[str, ...]:
    """The module-name patterns diffusers' layerwise casting never casts (norms, position embeddings, ...)."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    return tuple(DEFAULT_SKIP_MODULES_PATTERN)


def layerwise_casting_hook(module: torch.nn.Module) -> Any:
    """The layerwise-casting hook registered on `module`, or None."""
    from diffusers.hooks.layerwise_casting import _LAYERWISE_CASTING_HOOK

    registry = getattr(module, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(_LAYERWISE_CASTING_HOOK)


def is_group_offloaded(module: torch.nn.Module) -> bool:
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    return bool(_is_group_offload_enabled(module))


# ------------------------------------------------------------------------------------------ context parallelism


def context_parallel_plan_types() -> tuple[type, type]:
    """(ContextParallelInput, ContextParallelOutput): the entries of a model's context-parallel plan."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    return ContextParallelInput, ContextParallelOutput


def context_parallel_configs() -> tuple[type, type]:
    """(ContextParallelConfig, ParallelConfig) as diffusers' context-parallel hooks and attention read them."""
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    return ContextParallelConfig, ParallelConfig


def apply_context_parallel(module: torch.nn.Module, config: Any, plan: dict) -> None:
    """diffusers' split/gather hooks for `plan` on `module` (what ModelMixin.enable_parallelism installs)."""
    from diffusers.hooks.context_parallel import apply_context_parallel as apply

    apply(module, config, plan)


def equipartition_sharder() -> type:
    """diffusers' even sharder: `shard(x, dim, mesh)` / `unshard(x, dim, mesh)`."""
    from diffusers.hooks.context_parallel import EquipartitionSharder

    return EquipartitionSharder


def gather_size_by_comm(size: int, group: Any) -> list[int]:
    """Every rank's `size` in rank order, exchanged the way diffusers' uneven ("anything") modes do."""
    from diffusers.models._modeling_parallel import gather_size_by_comm as gather

    return gather(size, group)


def templated_context_parallel_attention(q, k, v, *, forward_op, backward_op, parallel_config) -> torch.Tensor:
    """diffusers' Ulysses/ring attention around a forward op of diffusers' signature ((B, S, H, D) tensors)."""
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    return _templated_context_parallel_attention(
        q, k, v, forward_op=forward_op, backward_op=backward_op, _parallel_config=parallel_config
    )


# ------------------------------------------------------------------------------------------ step caching


def first_block_cache_parts() -> tuple[Any, Any, Any, Any]:
    """(StateManager, FBCSharedBlockState, apply_head_block_hook, apply_block_hook) of diffusers' FirstBlockCache,
    to span the cache over a chosen range of blocks (see contentv.speedup.first_block_cache)."""
    from diffusers.hooks.first_block_cache import (
        FBCSharedBlockState,
        _apply_fbc_block_hook,
        _apply_fbc_head_block_hook,
    )
    from diffusers.hooks.hooks import StateManager

    return StateManager, FBCSharedBlockState, _apply_fbc_head_block_hook, _apply_fbc_block_hook


# ------------------------------------------------------------------------------------------ attention


def attention_backend_problem(name: str) -> str | None:
    """Why diffusers' attention dispatch can't run backend `name` here (package missing, too old, or failing to
    import: diffusers then leaves the kernel unset and the first call fails), or None if it can."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except RuntimeError as exc:
        return str(exc).strip()
    return None


# ------------------------------------------------------------------------------------------ quantization libraries

# Package -> diffusers' availability flag for it (diffusers.utils.import_utils).
_AVAILABILITY_FLAGS = {"torchao": "_torchao_available", "bitsandbytes": "_bitsandbytes_available"}


_TRANSFORMERS_TORCHAO: list = []  # transformers' own is_torchao_available, while deferred


def defer_quantization_libraries() -> bool:
    """Keep diffusers and transformers from importing torchao and bitsandbytes with their models: they import them
    (with their import-time warnings and ~1.5 s) for their own quantizers, which this runtime doesn't use (it
    quantizes with the libraries directly, and only when asked: `use_quantization_library`). Call before their
    models are imported (the entry point does); returns False if that is too late.

    diffusers reads module flags (diffusers.utils.import_utils); transformers a function its torchao quantizer binds
    at import (transformers.utils.is_torchao_available), swapped here and restored by use_quantization_library.
    """
    import sys

    if "diffusers.models.modeling_utils" in sys.modules or "transformers.quantizers" in sys.modules:
        return False
    import diffusers.utils.import_utils as iu
    import transformers.utils as tu

    for flag in _AVAILABILITY_FLAGS.values():
        setattr(iu, flag, False)
    if not _TRANSFORMERS_TORCHAO:
        _TRANSFORMERS_TORCHAO.append(tu.is_torchao_available)
        tu.is_torchao_available = lambda *args, **kwargs: False
    return True


def use_quantization_library(package: str) -> None:
    """Tell the libraries `package` is there again before it is used (e.g. diffusers' group offloading moves torchao
    tensors only when it believes torchao is available)."""
    import importlib.util

    import diffusers.utils.import_utils as iu

    if package not in _AVAILABILITY_FLAGS or importlib.util.find_spec(package) is None:
        return
    setattr(iu, _AVAILABILITY_FLAGS[package], True)
    if package == "torchao" and _TRANSFORMERS_TORCHAO:
        import transformers.utils as tu

        tu.is_torchao_available = _TRANSFORMERS_TORCHAO.pop()
