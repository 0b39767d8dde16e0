"""Issue 18 §3: the planner's bitsandbytes int8 temporaries against the allocations of a real int8 layer.

On the CPU: torch.profiler's allocation events (every allocation and free of the CPU allocator, inside
bitsandbytes' ops too) over one forward of backends/memory.py's Int8Linear give its peak. On a GPU the same with
the caching allocator's peak (run by benchmarks/gpu_check.sh when bitsandbytes is carried)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from backends import memory as mem
from backends.cpu import CPUBackend as CPU
from backends.cuda import CUDABackend as CUDA
from contentv.planner.activations import activation_bytes, bnb_int8_bytes_per_token


def cpu_peak_bytes(fn) -> int:
    """Peak bytes allocated while `fn` runs, from the profiler's allocation events (frees are negative)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def int8_layer(dim: int, ff: int, dtype: torch.dtype, device: str = "cpu") -> nn.Module:
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    return mem._bnb_int8(nn.Linear(dim, ff).to(dtype).eval(), torch.device(device)).to(device)


def planned(dim: int, ff: int, tokens: int, dtype: torch.dtype, dequant: str) -> int:
    """The planner's FF peak with nothing else alive (live=0): the layer's temporaries and its output."""
    kw = dict(batch=1, video_tokens=tokens, text_tokens=0, dim=dim, ff_dim=ff, dtype=dtype, live=0.0)
    return activation_bytes(**kw, quantization="bnb_int8", int8_dequant=dequant)


@pytest.mark.parametrize(("dim", "ff", "tokens"), [(256, 1024, 512), (384, 1536, 512)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_planned_int8_temporaries_match_a_real_layer_on_the_cpu(dim, ff, tokens, dtype):
    """The same on any x86-64 CPU: with AVX-512 the int32 matmul is torch._int_mm; without, bitsandbytes falls
    back to an fp32 matmul that also copies the weight to fp32 (4 ff dim bytes) and peaks at 9 dim + 8 ff + 4 per
    token, below the dequant's 16 ff + dim + 4 for tokens > 4 ff dim / (8 ff - 4 dim) (~220 here): 512 tokens."""
    layer = int8_layer(dim, ff, dtype)
    x = torch.randn(1, tokens, dim, dtype=dtype)
    with torch.no_grad():
        layer(x)  # first call: bitsandbytes' lazy set-up is not a temporary
        measured = cpu_peak_bytes(lambda: layer(x))
    assert measured == tokens * bnb_int8_bytes_per_token(dim, ff, "fp32")
    assert planned(dim, ff, tokens, dtype, CPU.bnb_int8_dequant) == measured


def test_the_cuda_path_counts_the_fp16_output_and_its_cast():
    """issue 18: ~8 ff bytes per token on CUDA (int32 accumulator, fp16 dequant output and its bf16 cast), ~1.5
    GiB more than the planner had at 432x768x125 in batch 2."""
    dim, ff, tokens = 2432, 4 * 2432, 2 * 41_805
    assert bnb_int8_bytes_per_token(dim, ff) - (dim + 6 * ff) == 2 * ff + 4
    assert 1.4 * 2**30 < tokens * (2 * ff) < 1.6 * 2**30


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_planned_int8_temporaries_match_a_real_layer_on_cuda(dtype):
    dim, ff, tokens = 2432, 9728, 4096
    layer = int8_layer(dim, ff, dtype, "cuda")
    x = torch.randn(1, tokens, dim, dtype=dtype, device="cuda")
    with torch.no_grad():
        layer(x)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        layer(x)
        measured = torch.cuda.max_memory_allocated() - base
    assert measured == pytest.approx(planned(dim, ff, tokens, dtype, CUDA.bnb_int8_dequant), rel=0.05)
