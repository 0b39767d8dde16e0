"""The NPU backend's contract, on CPU, against the strict torch_npu stand-in (tests/npu_standin.py).

What waits for hardware is marked `npu` and skips without torch_npu: the real kernels at ContentV's shape.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import backends
from backends.npu import NPUBackend
from contentv.attention import sdpa
from contentv.config import BackendConfig, MemoryConfig
from contentv.errors import ConfigError
from contentv.models.contentv.attention import ContentVJointAttnProcessor
from contentv.models.contentv.transformer import SD3Transformer3DModel
from tests.npu_standin import StandIn, StandInError, install, uninstall

ROOT = Path(__file__).resolve().parents[1]
# A real torch_npu (an Ascend machine) has package metadata and a real torch.npu, which the
# stand-in's isolation checks assume absent.
HAS_TORCH_NPU = importlib.util.find_spec("torch_npu") is not None
isolation_only = pytest.mark.skipif(HAS_TORCH_NPU, reason="a real torch_npu is installed")


@pytest.fixture
def npu(monkeypatch: pytest.MonkeyPatch):
    """The stand-in torch_npu with one visible device."""
    standin = install(monkeypatch)
    yield standin
    uninstall()


def _qkv(b: int, n: int, s: int, d: int, dtype=torch.float32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, s, d, generator=g).to(dtype) for _ in range(3)]  # (B, N, S, D)


def _to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, N, S, D) -> layout."""
    b, n, s, d = x.shape
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(1, 2).contiguous()
    if layout == "BSH":
        return x.transpose(1, 2).reshape(b, s, n * d)
    return x.transpose(1, 2).reshape(b, s, n * d).transpose(0, 1).contiguous()  # SBH


def _from_layout(x: torch.Tensor, layout: str, n: int) -> torch.Tensor:
    """layout -> (B, N, S, D)."""
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(1, 2)
    if layout == "SBH":
        x = x.transpose(0, 1)
    b, s, h = x.shape
    return x.reshape(b, s, n, h // n).transpose(1, 2)


# ------------------------------------------------------------------------------------------ the stand-in


@isolation_only
def test_standin_has_real_spec_and_no_metadata(npu: StandIn):
    import importlib.metadata

    from diffusers.utils import is_torch_npu_available as diffusers_npu
    from transformers.utils import is_torch_npu_available as transformers_npu

    assert importlib.util.find_spec("torch_npu") is sys.modules["torch_npu"].__spec__
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("torch-npu")
    assert not diffusers_npu() and not transformers_npu()
    assert torch.device("npu", 0).type == "npu"


@isolation_only
def test_standin_leaves_nothing_behind():
    from accelerate.utils import is_npu_available as accelerate_npu
    from transformers.utils import is_torch_npu_available as transformers_npu

    with pytest.MonkeyPatch.context() as mp:
        install(mp)
        import torch_npu  # noqa: F401

        assert hasattr(torch, "npu")
        uninstall()
    assert "torch_npu" not in sys.modules and not hasattr(torch, "npu")
    assert not accelerate_npu() and not transformers_npu()


def test_standin_rejects_misspelled_keywords(npu: StandIn):
    import torch_npu

    q, k, v = _qkv(1, 2, 8, 16, torch.bfloat16)
    with pytest.raises(TypeError, match="pre_tokens"):  # npu_fusion_attention spells it pre_tockens
        torch_npu.npu_fusion_attention(q, k, v, 2, "BNSD", pre_tokens=65536)
    with pytest.raises(TypeError, match="scale_value"):  # renamed to scale in current torch_npu
        torch_npu.npu_fused_infer_attention_score(q, k, v, num_heads=2, input_layout="BNSD", scale_value=0.25)
    with pytest.raises(TypeError):  # everything after input_layout is keyword-only
        torch_npu.npu_fusion_attention(q, k, v, 2, "BNSD", None, None, None, 0.25)
    assert npu.calls == []


@pytest.mark.parametrize(
    "layout, heads, shape",
    [("BNSD", 3, (1, 2, 8, 16)), ("BSND", 4, (1, 8, 2, 16)), ("BSH", 3, (1, 8, 32)), ("SBH", 5, (8, 1, 32))],
)
def test_standin_rejects_wrong_head_num(npu: StandIn, layout: str, heads: int, shape: tuple[int, ...]):
    import torch_npu

    q = torch.zeros(shape, dtype=torch.bfloat16)
    with pytest.raises(StandInError, match="head"):
        torch_npu.npu_fusion_attention(q, q, q, heads, input_layout=layout, scale=0.25)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(dtype=torch.float32), "dtype"),
        (dict(head_dim=24), "head_dim"),
        (dict(head_dim=528), "head_dim"),
        (dict(keep_prob=0.9), "keep_prob"),
        (dict(layout="TND"), "input_layout"),
        (dict(mask_dtype=torch.float16), "atten_mask dtype"),
    ],
)
def test_standin_rejects_what_the_device_rejects(npu: StandIn, change: dict, match: str):
    import torch_npu

    d = change.get("head_dim", 16)
    q, k, v = _qkv(1, 2, 8, d, change.get("dtype", torch.bfloat16))
    mask = torch.zeros(8, 8, dtype=change["mask_dtype"]) if "mask_dtype" in change else None
    with pytest.raises(StandInError, match=match):
        torch_npu.npu_fusion_attention(
            q,
            k,
            v,
            2,
            input_layout=change.get("layout", "BNSD"),
            atten_mask=mask,
            keep_prob=change.get("keep_prob", 1.0),
        )


def test_standin_returns_seven_tuple_in_input_layout_and_dtype(npu: StandIn):
    import torch_npu

    q, k, v = (_to_layout(t, "BSND") for t in _qkv(2, 2, 8, 16, torch.bfloat16))
    result = torch_npu.npu_fusion_attention(q, k, v, 2, input_layout="BSND", scale=0.25)
    assert isinstance(result, tuple) and len(result) == 7
    assert result[0].shape == q.shape and result[0].dtype == torch.bfloat16
    out, lse = torch_npu.npu_fused_infer_attention_score(
        q, k, v, num_heads=2, input_layout="BSND", scale=0.25, softmax_lse_flag=True
    )
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and lse.shape == (2, 2, 8, 1)


@pytest.mark.parametrize("mask_shape", [(8, 12), (1, 1, 8, 12), (2, 1, 8, 12), (2, 3, 8, 12)])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8])
def test_standin_mask_true_means_masked_out(npu: StandIn, mask_shape: tuple[int, ...], mask_dtype: torch.dtype):
    import torch_npu

    npu.strict_dtype = False  # fp32, so the comparison with SDPA is exact rather than within bf16 rounding
    q = _qkv(2, 3, 8, 16)[0]
    k, v = _qkv(2, 3, 12, 16, seed=1)[:2]
    g = torch.Generator().manual_seed(2)
    masked = torch.rand(mask_shape, generator=g) < 0.5  # True = masked out (NPU semantics)
    masked[..., 0] = False  # every query keeps at least one key
    scale, mask = 1 / math.sqrt(16), masked.to(mask_dtype)
    for out in (
        torch_npu.npu_fusion_attention(q, k, v, 3, input_layout="BNSD", atten_mask=mask, scale=scale)[0],
        torch_npu.npu_fused_infer_attention_score(
            q, k, v, num_heads=3, input_layout="BNSD", atten_mask=mask, scale=scale
        )[0],
    ):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=~masked)  # SDPA: True = attend
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(out, F.scaled_dot_product_attention(q, k, v, attn_mask=masked))


def test_standin_token_band_applies_only_with_a_mask(npu: StandIn):
    """Why the backend never passes the reference's pre/next_tockens=65536 with a mask: they band-limit."""
    import torch_npu

    npu.strict_dtype = False
    q, k, v = _qkv(1, 2, 10, 16)
    nothing = torch.zeros(10, 10, dtype=torch.bool)
    banded = torch_npu.npu_fusion_attention(
        q, k, v, 2, input_layout="BNSD", atten_mask=nothing, scale=0.25, pre_tockens=2, next_tockens=1
    )[0]
    offset = torch.arange(10)[None, :] - torch.arange(10)[:, None]
    band = (offset >= -2) & (offset <= 1)
    torch.testing.assert_close(banded, F.scaled_dot_product_attention(q, k, v, attn_mask=band, scale=0.25))
    dense = torch_npu.npu_fusion_attention(q, k, v, 2, input_layout="BNSD", scale=0.25, pre_tockens=2, next_tockens=1)
    torch.testing.assert_close(dense[0], F.scaled_dot_product_attention(q, k, v, scale=0.25))


@pytest.mark.parametrize("layout", ["BSND", "BNSD", "BSH", "SBH"])
def test_standin_every_layout_equals_sdpa(npu: StandIn, layout: str):
    import torch_npu

    npu.strict_dtype = False
    q, k, v = _qkv(2, 3, 10, 32)
    scale = 1 / math.sqrt(32)
    expected = F.scaled_dot_product_attention(q, k, v)
    args = [_to_layout(t, layout) for t in (q, k, v)]
    out = torch_npu.npu_fusion_attention(*args, 3, input_layout=layout, scale=scale)[0]
    assert out.shape == args[0].shape
    torch.testing.assert_close(_from_layout(out, layout, 3), expected, rtol=1e-5, atol=1e-6)
    if layout != "SBH":  # the fused-infer op has no SBH
        out = torch_npu.npu_fused_infer_attention_score(*args, num_heads=3, input_layout=layout, scale=scale)[0]
        torch.testing.assert_close(_from_layout(out, layout, 3), expected, rtol=1e-5, atol=1e-6)


def test_standin_fused_infer_rejects_non_contiguous(npu: StandIn):
    import torch_npu

    q = torch.zeros(1, 8, 2, 16, dtype=torch.bfloat16).transpose(1, 2)  # a BNSD view, not contiguous
    with pytest.raises(StandInError, match="contiguous"):
        torch_npu.npu_fused_infer_attention_score(q, q, q, num_heads=2, input_layout="BNSD", scale=0.25)


# ------------------------------------------------------------------------------------------ building the backend


def test_auto_selects_npu_only_when_use_ascend_npu_is_set(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("USE_ASCEND_NPU", "1")
    assert backends.resolve_name("auto") == "npu"
    monkeypatch.setenv("USE_ASCEND_NPU", "0")
    assert backends.resolve_name("auto") != "npu"


def test_torch_npu_never_imported_by_other_backends():
    """In a fresh process: importing everything and building the cpu backend never looks torch_npu up.

    A meta-path spy sees every lookup, even one whose ImportError is caught; lookups by diffusers,
    transformers and accelerate (their own availability checks) are theirs, not ours.
    """
    code = textwrap.dedent(
        """
        import sys, traceback

        ours = []

        class Spy:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "torch_npu":
                    files = [f.filename for f in traceback.extract_stack()[:-1]]
                    caller = [f for f in files if "importlib" not in f and not f.startswith("<")][-1]
                    if "site-packages" not in caller:
                        ours.append(caller)
                return None

        sys.meta_path.insert(0, Spy())
        import backends, backends.cpu, backends.npu, contentv.runtime
        import contentv.models.contentv.pipeline
        from contentv.config import BackendConfig

        backends.build_backend(BackendConfig(name="cpu"))
        assert "torch_npu" not in sys.modules, "torch_npu was imported"
        assert not ours, f"torch_npu looked up from {ours}"
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "USE_ASCEND_NPU": "0"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_building_without_torch_npu_is_a_one_line_config_error(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # as if not installed, even where it is
    with pytest.raises(ConfigError) as err:
        backends.build_backend(BackendConfig(name="npu"))
    message = str(err.value)
    assert err.value.option == "backend.name" and "\n" not in message
    assert "torch_npu" in message and "pip install '.[npu]'" in message and "CANN" in message


def test_bad_npu_layout_fails_at_build_before_torch_npu(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    with pytest.raises(ConfigError, match="backend.npu_layout") as err:
        NPUBackend(BackendConfig(name="npu", npu_layout="BHSD"))
    assert "BNSD" in str(err.value) and "BSND" in str(err.value)


def test_no_visible_npu_and_bad_device_index(monkeypatch: pytest.MonkeyPatch):
    standin = install(monkeypatch, available=False)
    try:
        with pytest.raises(ConfigError, match="backend.name"):
            NPUBackend(BackendConfig(name="npu"))
        standin.npu.available = True
        with pytest.raises(ConfigError, match=r"backend.device_index=1 .*0\.\.0"):
            NPUBackend(BackendConfig(name="npu", device_index=1))
    finally:
        uninstall()


def test_build_setup_stats_and_describe(npu: StandIn, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("USE_ASCEND_NPU", "1")
    backend = backends.build_backend(BackendConfig(name="auto"))
    assert isinstance(backend, NPUBackend) and backend.device == torch.device("npu", 0)
    assert backend.supports_offload_streams is False

    backend.setup()
    assert npu.npu.called("set_device") == [((backend.device,), {})]
    assert npu.npu.config.allow_internal_format is False
    assert npu.npu.called("set_compile_mode") == [((), {"jit_compile": False})]

    backend.synchronize()
    backend.reset_peak_memory()
    assert backend.peak_memory() == npu.npu.peak
    backend.empty_cache()
    for name in ("synchronize", "reset_peak_memory_stats", "max_memory_allocated"):
        assert npu.npu.called(name) == [((backend.device,), {})]
    assert npu.npu.called("empty_cache") == [((), {})]

    info = backend.describe()
    assert info["backend"] == "npu" and info["device"] == "npu:0"
    assert info["name"] == "Ascend910B3 (stand-in)" and "torch_npu" in info


def test_kernel_table_and_quantization(npu: StandIn):
    backend = NPUBackend(BackendConfig(name="npu"))
    assert list(backend.kernels()) == ["npu_fusion", "npu_fused_infer", "sdpa"]
    assert backend.attention_kernel().__name__ == "npu_fusion" and backend.kernel_name == "npu_fusion"
    assert NPUBackend(BackendConfig(name="npu", attention="sdpa")).attention_kernel() is sdpa
    with pytest.raises(ConfigError, match="backend.attention"):
        NPUBackend(BackendConfig(name="npu", attention="flash")).attention_kernel()

    assert "bnb_int8" not in backend.quantization_methods()
    for method in ("bnb_int8", "bnb_nf4"):
        with pytest.raises(ConfigError, match="memory.quantization") as err:
            backend.check_memory(MemoryConfig(quantization=method))
        assert "fp8" in str(err.value) and "torchao_int8" in str(err.value)
    backend.check_memory(MemoryConfig(quantization="fp8"))


# ------------------------------------------------------------------------------------------ kernels


@pytest.mark.parametrize(
    "attention, layout", [("npu_fusion", "BNSD"), ("npu_fusion", "BSND"), ("npu_fused_infer", "BNSD")]
)
def test_backend_kernels_equal_sdpa_in_bf16(npu: StandIn, attention: str, layout: str):
    kernel = NPUBackend(BackendConfig(name="npu", attention=attention, npu_layout=layout)).attention_kernel()
    g = torch.Generator().manual_seed(0)
    b, n, s, d = 2, 3, 40, 64
    # (B, S, N, D) transposed to (B, N, S, D) views, as the attention processor hands them over
    q, k, v = (torch.randn(b, s, n, d, generator=g).to(torch.bfloat16).transpose(1, 2) for _ in range(3))
    out = kernel(q, k, v)
    assert out.shape == (b, n, s, d) and out.dtype == torch.bfloat16
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(torch.bfloat16)
    # Outputs are O(0.1..1): a bf16 rounding step there is 2**-10..2**-8.
    torch.testing.assert_close(out, exact, rtol=2**-7, atol=2**-8)
    torch.testing.assert_close(out, sdpa(q, k, v), rtol=2**-7, atol=2**-8)  # CPU's bf16 SDPA rounds differently

    [(op, call)] = npu.calls
    assert call["scale"] == pytest.approx(1 / math.sqrt(d), rel=1e-12)
    assert call["dtype"] == torch.bfloat16 and call["atten_mask"] is False
    if attention == "npu_fusion":
        assert op == "npu_fusion_attention" and call["head_num"] == n and call["input_layout"] == layout
        assert call["shape"] == ((b, s, n, d) if layout == "BSND" else (b, n, s, d))
        assert call["keep_prob"] == 1.0 and call["pre_tockens"] == call["next_tockens"] == 2147483647
    else:
        assert op == "npu_fused_infer_attention_score" and call["num_heads"] == n and call["input_layout"] == "BNSD"


@pytest.mark.parametrize("attention", ["npu_fusion", "npu_fused_infer"])
def test_fp32_goes_to_sdpa(npu: StandIn, attention: str):
    kernel = NPUBackend(BackendConfig(name="npu", attention=attention)).attention_kernel()
    q, k, v = _qkv(1, 2, 16, 16)
    assert torch.equal(kernel(q, k, v), sdpa(q, k, v))
    assert npu.calls == []  # the strict stand-in would have rejected fp32


def _tiny_transformer(dtype: torch.dtype) -> SD3Transformer3DModel:
    torch.manual_seed(0)
    model = SD3Transformer3DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        caption_projection_dim=32,
        pooled_projection_dim=16,
        out_channels=4,
    )
    return model.eval().to(dtype)


def _run_transformer(model: SD3Transformer3DModel, kernel, dtype: torch.dtype) -> torch.Tensor:
    model.set_attn_processor(ContentVJointAttnProcessor(kernel))
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 3, 8, 8, generator=g).to(dtype)  # (B, C, T, H, W): 48 video tokens
    text = torch.randn(1, 7, 24, generator=g).to(dtype)
    pooled = torch.randn(1, 16, generator=g).to(dtype)
    with torch.no_grad():
        return model(latents, text, pooled, torch.tensor([500.0]), return_dict=False)[0]


@pytest.mark.parametrize("attention", ["npu_fusion", "npu_fused_infer"])
def test_contentv_transformer_npu_kernel_equals_sdpa(npu: StandIn, attention: str):
    backend = NPUBackend(BackendConfig(name="npu", attention=attention))
    # fp32: routed to SDPA, so exactly equal
    model = _tiny_transformer(torch.float32)
    assert torch.equal(
        _run_transformer(model, backend.attention_kernel(), torch.float32), _run_transformer(model, sdpa, torch.float32)
    )
    assert npu.calls == []
    # bf16 through the strict stand-in: equal within bf16 rounding
    model = _tiny_transformer(torch.bfloat16)
    out = _run_transformer(model, backend.attention_kernel(), torch.bfloat16).float()
    ref = _run_transformer(model, sdpa, torch.bfloat16).float()
    assert len(npu.calls) == 2  # one joint attention per block
    assert (out - ref).abs().max() <= 0.02 * ref.abs().max()
    assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999


# ------------------------------------------------------------------------------------------ placement


@pytest.fixture
def device_calls(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record every device handed to `nn.Module.to`; refuse real moves to npu (there is none) and any cuda."""
    moves: list = []
    original = torch.nn.Module.to

    def to(self, *args, **kwargs):
        device, dtype, *_ = torch._C._nn._parse_to(*args, **kwargs)
        moves.append(("Module.to", type(self).__name__, device))
        if device is not None and device.type == "npu":
            return original(self, dtype) if dtype is not None else self  # recorded, not moved
        return original(self, *args, **kwargs)

    def no_cuda(self, *args, **kwargs):
        raise AssertionError(".cuda() called")

    monkeypatch.setattr(torch.nn.Module, "to", to)
    monkeypatch.setattr(torch.nn.Module, "cuda", no_cuda)
    monkeypatch.setattr(torch.Tensor, "cuda", no_cuda)
    return moves


MEMORY = {
    "device": MemoryConfig(),
    "model_cpu_offload": MemoryConfig(name="model", model_cpu_offload=True, text_encoders="auto"),
    "sequential_cpu_offload": MemoryConfig(name="sequential", sequential_cpu_offload=True, text_encoders="auto"),
    "group_offload": MemoryConfig(name="group", group_offload=True, group_offload_stream=True),
    "group_offload_all": MemoryConfig(name="group", group_offload=True, text_encoders="offload"),
}


def _record_offload_calls(monkeypatch: pytest.MonkeyPatch, pipe, calls: list) -> None:
    """Replace diffusers' offload entry points (wherever memory.py reaches them) by recorders."""
    import diffusers.hooks
    from diffusers.models.modeling_utils import ModelMixin

    def recorder(name: str):
        def record(*args, **kwargs):
            calls.append((name, args, kwargs))

        return record

    for name in ("to", "enable_model_cpu_offload", "enable_sequential_cpu_offload"):
        for cls in type(pipe).__mro__:  # the class's own method and every override up to DiffusionPipeline
            if name in vars(cls):
                monkeypatch.setattr(cls, name, recorder(f"pipe.{name}"))
    monkeypatch.setattr(ModelMixin, "enable_group_offload", recorder("enable_group_offload"))
    monkeypatch.setattr(diffusers.hooks, "apply_group_offloading", recorder("apply_group_offloading"))


@pytest.mark.parametrize("preset", list(MEMORY))
def test_prepare_hands_the_npu_device_to_diffusers(npu: StandIn, tiny_pipe, device_calls: list, preset: str):
    from contentv.models.contentv import SPEC

    monkeypatch = pytest.MonkeyPatch()
    try:
        _record_offload_calls(monkeypatch, tiny_pipe, device_calls)
        applied = NPUBackend(BackendConfig(name="npu")).prepare(tiny_pipe, MEMORY[preset], SPEC)
    finally:
        monkeypatch.undo()  # the class-level recorders must not outlive the call
    calls = device_calls
    npu0 = torch.device("npu", 0)

    assert applied["attention_kernel"] == "npu_fusion"
    assert {p.kernel.__name__ for p in tiny_pipe.transformer.attn_processors.values()} == {"npu_fusion"}
    assert "cuda" not in repr(calls) and "cuda" not in repr(applied)
    assert tiny_pipe.execution_device == npu0
    assert not [c for c in calls if c[0] == "pipe.to"]
    offload = {name: kwargs for name, _, kwargs in calls if name.startswith("pipe.enable")}
    groups = [
        (args[0], kwargs) for name, args, kwargs in calls if name in ("enable_group_offload", "apply_group_offloading")
    ]
    moved = {cls: dev for what, cls, dev in calls if what == "Module.to" and dev is not None and dev.type != "cpu"}
    assert set(moved.values()) <= {npu0}

    if preset == "model_cpu_offload":
        assert offload == {"pipe.enable_model_cpu_offload": {"device": npu0}}
    elif preset == "sequential_cpu_offload":
        assert offload == {"pipe.enable_sequential_cpu_offload": {"device": npu0}}
    elif preset == "device":
        assert not offload and not groups
        assert {"SD3Transformer3DModel", "AutoencoderKLWan", "T5EncoderModel"} <= set(moved)
    else:
        assert not offload and groups
        assert tiny_pipe.transformer in [module for module, _ in groups]
        for _, kwargs in groups:
            assert kwargs["onload_device"] == npu0 and kwargs["offload_device"] == torch.device("cpu")
            assert kwargs["use_stream"] is False  # no offload streams on NPU
        assert "SD3Transformer3DModel" not in moved  # streamed by the hooks, not moved
        assert "AutoencoderKLWan" in moved
        assert "stream False" in applied["placement"]
        if preset == "group_offload_all":
            assert {"T5EncoderModel", "CLIPTextModelWithProjection"} <= {type(m).__name__ for m, _ in groups}


# ------------------------------------------------------------------------------------------ hardware


@pytest.mark.npu
@pytest.mark.skipif(not HAS_TORCH_NPU, reason="needs torch_npu and an Ascend NPU")
@pytest.mark.parametrize(
    "attention, layout", [("npu_fusion", "BNSD"), ("npu_fusion", "BSND"), ("npu_fused_infer", "BNSD")]
)
def test_real_kernel_at_contentv_shape(attention: str, layout: str):
    """The device takes ContentV-8B's attention at its default size and matches fp32.

    125 frames at 432x768: 32 x 27 x 48 video + 333 text = 41,805 tokens, 38 heads of 64.
    """
    try:
        backend = NPUBackend(BackendConfig(name="npu", attention=attention, npu_layout=layout))
    except ConfigError as e:
        pytest.skip(str(e))
    backend.setup()
    kernel = backend.attention_kernel()
    b, n, s, d = 1, 38, 41805, 64
    torch.manual_seed(0)
    # (B, S, N, D) transposed to (B, N, S, D) views, as the attention processor hands them over
    q, k, v = (torch.randn(b, s, n, d, device=backend.device, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    out = kernel(q, k, v)
    backend.synchronize()
    assert out.shape == (b, n, s, d) and out.dtype == torch.bfloat16 and out.device == backend.device
    assert torch.isfinite(out).all()
    rows = torch.randint(0, s, (128,), device=backend.device)  # a full fp32 reference would need ~260 GB
    scores = (q[:, :, rows].float() @ k.float().transpose(-1, -2)) / math.sqrt(d)  # (B, N, 128, S)
    ref = scores.softmax(-1) @ v.float()
    torch.testing.assert_close(out[:, :, rows].float(), ref, rtol=2e-2, atol=2e-2)
