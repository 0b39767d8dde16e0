"""Device backends, looked up by name: `backend=npu` <-> conf/backend/npu.yaml <-> BACKENDS["npu"].

Each backend lives in its own module and is imported only when selected, so a CUDA machine never imports
torch_npu. Adding a device: its file here, a conf/backend/<name>.yaml, and one line in BACKENDS (or, from
outside this package, one `register()` call).
"""

from __future__ import annotations

import importlib
import logging
import os

from contentv.config import BackendConfig
from contentv.errors import ConfigError

log = logging.getLogger(__name__)

BACKENDS = {
    "cpu": "backends.cpu:CPUBackend",
    "cuda": "backends.cuda:CUDABackend",
    "npu": "backends.npu:NPUBackend",
}


def names() -> tuple[str, ...]:
    """Every valid backend.name: auto and the registered backends."""
    return ("auto", *BACKENDS)


def register(name: str, target: str) -> None:
    """Register a backend class by "module:Class" under `name` (plugins and test-only backends)."""
    BACKENDS[name] = target


def resolve_name(name: str) -> str:
    """auto -> npu if USE_ASCEND_NPU=1 (the reference's switch), else cuda if visible, else cpu."""
    if name not in names():
        raise ConfigError("backend.name", name, names())
    if name != "auto":
        return name
    if os.environ.get("USE_ASCEND_NPU", "0") not in ("", "0"):
        chosen, why = "npu", "USE_ASCEND_NPU is set"
    else:
        import torch

        if torch.cuda.is_available():
            chosen, why = "cuda", "a CUDA GPU is visible"
        else:
            chosen, why = "cpu", "no CUDA GPU is visible"
    log.info("backend=auto chose %s (%s)", chosen, why)
    return chosen


def backend_class(name: str) -> type:
    """The Backend class registered under `name` (after resolving auto); imports only its module."""
    module, _, cls = BACKENDS[resolve_name(name)].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_backend(cfg: BackendConfig):
    """Build the configured backend (ConfigError if unknown or its device is not visible)."""
    return backend_class(cfg.name)(cfg)
