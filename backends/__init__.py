"""Device backends, looked up by name: `backend=npu` <-> conf/backend/npu.yaml <-> BACKENDS["npu"].

Each backend lives in its own module and is imported only when selected (or asked whether its device is
present), so a CUDA machine never imports torch_npu. Adding a device: its file here, a conf/backend/<name>.yaml,
and one line in BACKENDS. Out-of-tree backends register the same line as an entry point of the group
`contentv.backends` (`name = "package.module:Class"`) and ship their YAML in a config folder added with
`hydra.searchpath=[file://...]` (README "Extending").
"""

from __future__ import annotations

import functools
import importlib
import logging
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from contentv.config import BackendConfig
from contentv.errors import ConfigError

if TYPE_CHECKING:  # backends.base imports torch: `--help` and pre-flight errors don't need it
    from backends.base import Backend

log = logging.getLogger(__name__)

# name -> "module:Class", in the order backend=auto asks them whether their device is present.
BACKENDS = {
    "npu": "backends.npu:NPUBackend",
    "cuda": "backends.cuda:CUDABackend",
    "cpu": "backends.cpu:CPUBackend",
}
ENTRY_POINT_GROUP = "contentv.backends"


@functools.cache
def _plugins() -> dict[str, str]:
    """Backends other packages register as entry points (after the built-in ones, so auto prefers those)."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in BACKENDS}


def registry() -> dict[str, str]:
    return {**BACKENDS, **_plugins()}


def names() -> tuple[str, ...]:
    """Every valid backend.name: auto and the registered backends (alphabetical)."""
    return ("auto", *sorted(registry()))


def register(name: str, target: str) -> None:
    """Register a backend class by "module:Class" under `name` (from Python; entry points do it for packages)."""
    BACKENDS[name] = target


def resolve_name(name: str) -> str:
    """auto -> the first registered backend whose device is present (NPU if USE_ASCEND_NPU=1/true/yes/on, the reference's
    switch; else CUDA if a GPU is visible; else the CPU); the choice is logged."""
    if name not in names():
        raise ConfigError("backend.name", name, names())
    if name != "auto":
        return name
    for candidate in registry():
        why = backend_class(candidate).detect()
        if why:
            log.info("backend=auto chose %s (%s)", candidate, why)
            return candidate
    raise ConfigError("backend.name", "auto", "a backend whose device is present: none was found")


def backend_class(name: str) -> type:
    """The Backend class registered under `name` (after resolving auto); imports only its module."""
    module, _, cls = registry()[resolve_name(name)].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_backend(cfg: BackendConfig) -> Backend:
    """Build the configured backend (ConfigError if unknown or its device is not visible)."""
    return backend_class(cfg.name)(cfg)
