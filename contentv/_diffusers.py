"""Every private diffusers API this runtime uses, behind one small adapter.

Why the pin: pyproject.toml requires `diffusers>=0.42,<0.43`. The names below are underscore names or live in
modules diffusers does not export (`diffusers.models._modeling_parallel`, `diffusers.hooks.context_parallel`,
`diffusers.hooks.first_block_cache` internals, `diffusers.hooks._common`), so any minor release may rename or
change them. Upgrading diffusers = re-checking this file (tests/test_diffusers_adapter.py imports every name)
and then moving the cap. Nothing else in contentv/ or backends/ may import them (a test enforces it).

Each accessor imports lazily: importing this module costs nothing until a feature is used.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from importlib.machinery import ModuleSpec
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from diffusers import ParallelConfig

    from contentv.attention import ForwardOp

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


def templated_context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    forward_op: ForwardOp,
    backward_op: Callable[..., Any],
    parallel_config: ParallelConfig,
) -> torch.Tensor:
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
# Whether the libraries stay deferred after their models load (the runtime: until a run quantizes) or only while
# they load (a Python user of the pipelines, who may quantize with diffusers' own configs afterwards).
_DEFERRAL = {"until_used": False}


def defer_quantization_libraries() -> bool:
    """Keep diffusers and transformers from importing torchao and bitsandbytes with their models: they import them
    (with their import-time warnings and ~1.5 s) for their own quantizers, which this runtime doesn't use (it
    quantizes with the libraries directly, and only when asked: `use_quantization_library`). Call before their
    models are imported (the entry point and Runtime do); returns False if that is too late.

    Nothing is imported here (so --help and pre-flight errors stay fast): an import hook patches the two libraries'
    availability checks right after their modules load. diffusers reads module flags
    (diffusers.utils.import_utils); transformers a function its torchao quantizer binds at import
    (transformers.utils.is_torchao_available), swapped here and restored by use_quantization_library.
    """
    import sys

    if "diffusers.models.modeling_utils" in sys.modules or "transformers.quantizers" in sys.modules:
        return False
    _DEFERRAL["until_used"] = True
    _install_deferral(restore_after_models=False)
    return True


def _install_deferral(restore_after_models: bool) -> None:
    """The import hook: availability off as the libraries load; back on once their models have loaded if asked
    (and no runtime asked for `defer_quantization_libraries` meanwhile)."""
    import sys

    hooks = {"diffusers.utils.import_utils": _diffusers_flags_off, "transformers.utils": _transformers_torchao_off}
    if restore_after_models:
        hooks["diffusers.models.modeling_utils"] = _diffusers_flags_on
        hooks["transformers.modeling_utils"] = _transformers_torchao_on
    for name, patch in list(hooks.items()):
        if name in sys.modules:  # already imported (not its models): patch now
            patch(sys.modules[name])
            del hooks[name]
    if hooks and not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(hooks))


def _diffusers_flags_off(module: types.ModuleType) -> None:
    for flag in _AVAILABILITY_FLAGS.values():
        setattr(module, flag, False)


def _transformers_torchao_off(module: types.ModuleType) -> None:
    if not _TRANSFORMERS_TORCHAO:
        _TRANSFORMERS_TORCHAO.append(module.is_torchao_available)
        module.is_torchao_available = lambda *args, **kwargs: False


def _diffusers_flags_on(_module: types.ModuleType) -> None:
    import importlib.util
    import sys

    iu = sys.modules["diffusers.utils.import_utils"]
    for package, flag in _AVAILABILITY_FLAGS.items():
        if not _DEFERRAL["until_used"] and importlib.util.find_spec(package) is not None:
            setattr(iu, flag, True)


def _transformers_torchao_on(_module: types.ModuleType) -> None:
    import sys

    if not _DEFERRAL["until_used"] and _TRANSFORMERS_TORCHAO:
        sys.modules["transformers.utils"].is_torchao_available = _TRANSFORMERS_TORCHAO.pop()


class _AfterImport:
    """A meta-path finder that runs `patch(module)` right after each named module has executed (once each)."""

    def __init__(self, patches: dict[str, Callable[[types.ModuleType], None]]):
        self.patches = dict(patches)

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> ModuleSpec | None:
        import sys

        if name not in self.patches:
            return None
        patch = self.patches.pop(name)
        if not self.patches:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:  # the spec the import system would have found
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None:
                execute = spec.loader.exec_module

                def exec_module(
                    module: types.ModuleType,
                    execute: Callable[[types.ModuleType], None] = execute,
                    patch: Callable[[types.ModuleType], None] = patch,
                ) -> None:
                    execute(module)
                    patch(module)

                spec.loader.exec_module = exec_module
                return spec
        return None


class _ImageProcessorNotice:
    """A logging filter dropping transformers' notice that an image processor falls back without torchvision."""

    def filter(self, record: Any) -> bool:
        return "requires torchvision" not in str(record.msg)


_IMAGE_PROCESSOR_NOTICE = _ImageProcessorNotice()


def quiet_library_imports() -> None:
    """What the pipelines' imports would print about code paths no run takes, kept quiet (the command line and
    the Python API alike; called when contentv.models is first imported, before diffusers' models load).

    - torchao and bitsandbytes: not imported with diffusers' and transformers' models (as defer_quantization_libraries
      does), then available again for whoever quantizes; the runtime keeps them deferred until a run quantizes.
    - transformers' "`CLIPImageProcessor` requires torchvision ... falling back" notices: diffusers' SD3 pipeline
      and IP-adapter loader import the image processor classes by name (never used: no pipeline here takes an
      image), and transformers 5 warns when the name is resolved. Only that notice is filtered; every other
      transformers warning shows as before.
    """
    import logging
    import sys

    if "diffusers.models.modeling_utils" not in sys.modules and "transformers.quantizers" not in sys.modules:
        # Off while diffusers' and transformers' models import, then on again: their quantization configs
        # (BitsAndBytesConfig, TorchAoConfig) keep working for a Python user who passes one.
        _install_deferral(restore_after_models=True)
    notices = logging.getLogger("transformers.utils.import_utils")
    if _IMAGE_PROCESSOR_NOTICE not in notices.filters:
        notices.addFilter(_IMAGE_PROCESSOR_NOTICE)


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


def first_block_cache_head(module: torch.nn.Module) -> Any:
    """The FirstBlockCache head-block hook registered inside `module` (it decides, per forward, whether the other
    blocks run: `hook.state_manager.get_state().should_compute`), or None."""
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        hook = registry.get_hook(_FBC_LEADER_BLOCK_HOOK) if registry is not None else None
        if hook is not None:
            return hook
    return None
