"""Device backends, looked up by name: `backend=npu` <-> conf/backend/npu.yaml <-> BACKENDS["npu"].

Each backend lives in its own module and is imported only when selected, so a CUDA machine never
imports torch_npu.
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
NAMES = ("auto", *BACKENDS)


def resolve_name(name: str) -> str:
    """auto -> npu if USE_ASCEND_NPU=1 (the reference's switch), else cuda if visible, else cpu."""
    if name not in NAMES:
        raise ConfigError("backend.name", name, NAMES)
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


def build_backend(cfg: BackendConfig):
    """Build the configured backend (ConfigError if unknown or its device is not visible)."""
    name = resolve_name(cfg.name)
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)(cfg)
