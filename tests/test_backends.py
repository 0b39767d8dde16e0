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


def test_cuda_kernel_table_names_missing_kernels(monkeypatch):
    from backends import cuda

    b = object.__new__(cuda.CUDABackend)
    b.cfg = BackendConfig(name="cuda", attention="sage")
    monkeypatch.setattr(cuda, "_installed", lambda name: False)
    with pytest.raises(ConfigError, match="sage is not installed"):
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
