"""Backend selection and the CPU backend's contract."""

from __future__ import annotations

import logging

import pytest
import torch

import backends
from contentv.config import BackendConfig
from contentv.errors import ConfigError


def test_auto_picks_cpu_without_a_gpu_and_logs(monkeypatch, caplog):
    monkeypatch.delenv("USE_ASCEND_NPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="backends"):
        assert backends.resolve_name("auto") == "cpu"
    assert "backend=auto chose cpu" in caplog.text


def test_auto_picks_cuda_when_visible(monkeypatch):
    monkeypatch.delenv("USE_ASCEND_NPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backends.resolve_name("auto") == "cuda"


def test_unknown_backend_lists_valid_names():
    with pytest.raises(ConfigError, match="auto, cpu, cuda, npu"):
        backends.build_backend(BackendConfig(name="tpu"))


def test_cpu_backend_contract():
    b = backends.build_backend(BackendConfig(name="cpu"))
    assert b.device == torch.device("cpu") and b.name == "cpu"
    kernel = b.attention_kernel()
    q, k, v = (torch.randn(1, 2, 5, 16) for _ in range(3))
    torch.testing.assert_close(kernel(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v))
    b.setup(), b.synchronize(), b.reset_peak_memory(), b.empty_cache()
    assert b.peak_memory() is None and b.describe()["backend"] == "cpu"
    with pytest.raises(ConfigError, match="backend.attention='flash'"):
        backends.build_backend(BackendConfig(name="cpu", attention="flash")).attention_kernel()


def test_cuda_backend_refuses_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="backend.name='cuda'"):
        backends.build_backend(BackendConfig(name="cuda"))


def test_cuda_kernels_installed_but_unusable_are_refused_with_the_version_needed(monkeypatch):
    """PyPI's sageattention is 1.0.6: installed, but diffusers needs >= 2.1.1 and leaves its kernel unset, so the
    first attention call would fail with 'NoneType' object is not callable. It is refused when chosen instead."""
    from diffusers.models import attention_dispatch
    from diffusers.utils import import_utils

    from backends import cuda

    b = object.__new__(cuda.CUDABackend)
    b.cfg = BackendConfig(name="cuda", attention="sage")
    monkeypatch.setattr(import_utils, "is_sageattention_available", lambda: True)  # installed ...
    monkeypatch.setattr(attention_dispatch, "_CAN_USE_SAGE_ATTN", False)  # ... but too old for diffusers
    with pytest.raises(
        ConfigError, match=r"backend.attention='sage' is not valid: a usable kernel: .*sageattention>=2\.1\.1"
    ):
        b.attention_kernel()
    b.cfg.attention = "flash"
    monkeypatch.setattr(attention_dispatch, "_CAN_USE_FLASH_ATTN", True)  # a usable flash-attn: accepted
    assert b.attention_kernel().__name__ == "flash" and b.kernel_name == "flash"
    monkeypatch.setattr(attention_dispatch, "_CAN_USE_FLASH_ATTN", False)
    with pytest.raises(ConfigError, match=r"flash-attn>=2\.6\.3"):
        b.attention_kernel()
    b.cfg.attention = "auto"
    assert b.attention_kernel() is not None and b.kernel_name == "sdpa"


@pytest.mark.cuda
def test_tiny_model_on_cuda_matches_cpu(tiny_ckpt):
    from contentv.config import MemoryConfig
    from contentv.models.contentv import SPEC
    from contentv.models.contentv.pipeline import ContentVPipeline

    outs = []
    for name in ("cpu", "cuda"):
        pipe = ContentVPipeline.from_pretrained(tiny_ckpt)
        backends.build_backend(BackendConfig(name=name)).prepare(pipe, MemoryConfig(), SPEC)
        latents = pipe(
            prompt="a cat",
            height=32,
            width=48,
            num_frames=5,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).frames
        outs.append(latents.float().cpu())
    cos = torch.nn.functional.cosine_similarity(outs[0].flatten(), outs[1].flatten(), dim=0)
    assert cos > 0.999


def test_runtime_sets_the_backend_up_once_on_every_path():
    """The Python API path (Runtime) applies the backend's process-wide switches (TF32/HF32, current device)
    itself; setup() is idempotent, so entry points that also call it don't apply them twice."""
    from backends.cpu import CPUBackend
    from contentv.runtime import Runtime

    calls = []

    class Recording(CPUBackend):
        def _setup(self) -> None:
            calls.append("setup")

    backend = Recording(BackendConfig(name="cpu"))
    assert calls == []
    Runtime(backend)
    assert calls == ["setup"]
    backend.setup()
    Runtime(backend)
    assert calls == ["setup"]
