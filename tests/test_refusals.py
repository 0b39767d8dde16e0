"""Issue 18 §2: combinations that would crash after a multi-GB load are refused before loading, in a dry run for
that device as well (a dry run plans with `backend_class(name).capabilities()`, no device), and one compile that
really runs."""

from __future__ import annotations

import dataclasses

import pytest

import backends
import demo
from backends.cuda import CUDABackend
from contentv import planner, speedup
from contentv.config import BackendConfig, MemoryConfig, RunConfig, SpeedupConfig
from contentv.errors import ConfigError
from contentv.validation import check_settings

MODELS = demo.load_presets(("model",)).models
PRESETS = {n: m for n, m in demo.load_presets(("memory",)).memories.items() if n != "auto"}


def tiny_run(backend: str = "cuda", attention: str = "auto", dtype: str = "float32", **speed) -> RunConfig:
    cfg = RunConfig(backend=BackendConfig(name=backend, attention=attention))
    cfg.model = dataclasses.replace(MODELS["tiny_contentv"], dtype=dtype)
    cfg.speedup = SpeedupConfig(**speed)
    cfg.sampling.prompt = "a red fox walks in snow"
    return cfg


# ------------------------------------------------------------------------------------------ half-precision kernels


@pytest.mark.parametrize("attention", ["flash", "flash3", "sage"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_16_bit_kernels_refuse_a_float32_model_in_a_dry_run_and_a_real_one(cache_dir, attention, dtype):
    caps = backends.backend_class("cuda").capabilities()  # what demo.py's dry run plans with
    cfg = tiny_run(attention=attention, dtype=dtype)
    if dtype == "bfloat16":
        planner.plan(cfg, PRESETS, caps)
        check_settings(cfg, caps)
        return
    with pytest.raises(ConfigError, match=f"backend.attention='{attention}'.*model.dtype=float32"):
        planner.plan(cfg, PRESETS, caps)
    with pytest.raises(ConfigError, match=f"backend.attention='{attention}'.*bfloat16 or float16"):
        check_settings(cfg, caps)  # validate_run passes the built backend: the same method
    assert CUDABackend.check_attention is not None and "flash" in CUDABackend.half_precision_kernels


def test_sdpa_and_other_backends_take_any_dtype(cache_dir):
    for name in ("cpu", "cuda"):
        caps = backends.backend_class(name).capabilities()
        for attention in ("auto", "sdpa"):
            check_settings(tiny_run(name, attention), caps)


# ------------------------------------------------------------------------------------------ compile x offload


def test_the_cuda_graph_modes_are_inductors():
    from torch._inductor import list_mode_options

    graphs = {m for m in speedup.COMPILE_MODES if list_mode_options(m).get("triton.cudagraphs")}
    assert graphs == set(speedup.CUDA_GRAPH_MODES)


@pytest.mark.parametrize("mode", speedup.COMPILE_MODES)
@pytest.mark.parametrize("offload", ["group_offload", "sequential_cpu_offload", "model_cpu_offload"])
def test_cuda_graphs_are_refused_with_offload_that_swaps_weights_per_forward(mode, offload):
    cfg, memory = SpeedupConfig(compile=True, compile_mode=mode), MemoryConfig(**{offload: True})
    if mode in speedup.CUDA_GRAPH_MODES and offload != "model_cpu_offload":
        with pytest.raises(ConfigError, match=f"speedup.compile_mode='{mode}'.*memory.{offload}"):
            speedup.check(cfg, memory)
    else:
        speedup.check(cfg, memory)
    speedup.check(dataclasses.replace(cfg, compile=False), memory)  # the mode alone is no compile


def test_a_named_preset_with_cuda_graphs_is_refused_and_auto_never_picks_one(cache_dir):
    cfg = tiny_run(compile=True, compile_mode="reduce-overhead")
    cfg.memory = PRESETS["low_vram_16g"]
    assert cfg.memory.group_offload
    with pytest.raises(ConfigError, match="speedup.compile_mode='reduce-overhead'"):
        check_settings(cfg)
    cfg.memory = MemoryConfig(name="auto")
    p = planner.plan(cfg, PRESETS, backends.backend_class("cuda").capabilities(), budget_bytes=2**40)
    swapping = [s for s in p.strategies if s.memory.group_offload or s.memory.sequential_cpu_offload]
    assert swapping and all("speedup.compile_mode" in s.error and not s.fits for s in swapping)


# ------------------------------------------------------------------------------------------ a real compile


COMPILE = """
import sys
import torch
from contentv import speedup
from contentv.attention import sdpa
from contentv.config import SpeedupConfig
from contentv.models.contentv import SPEC
from contentv.models.contentv.pipeline import ContentVPipeline

pipe = ContentVPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float32)
SPEC.install_attention(pipe, sdpa)
pipe.set_progress_bar_config(disable=True)
call = dict(prompt="a red fox", height=32, width=48, num_frames=5, num_inference_steps=2, output_type="latent")
eager = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
torch._dynamo.reset()
counters = torch._dynamo.utils.counters
counters.clear()
applied = speedup.apply(pipe, SpeedupConfig(compile=True, compile_mode="default"))
assert applied["compile"] == "repeated blocks, mode default", applied
compiled = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])  # dynamo really captured a graph
torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
print("compiled and equal")
"""


@pytest.mark.slow
def test_regional_compile_really_compiles_and_computes_the_same(tiny_ckpt):
    """No monkeypatched nn.Module.compile: inductor builds the tiny transformer's blocks on the CPU (C++ codegen)
    and the latents match the eager run's. In its own process: the NPU stand-in's tests name the PrivateUse1 device
    `npu` for the rest of theirs (torch allows one rename per process), and dynamo then looks for `torch.npu`."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", COMPILE, tiny_ckpt], capture_output=True, text=True, timeout=1200, env=env, cwd=root
    )
    assert out.returncode == 0 and "compiled and equal" in out.stdout, out.stderr[-3000:]
