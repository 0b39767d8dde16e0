"""The virtual accelerator's contract (tests/virtual_device.py) and the libraries the runtime uses on it."""

from __future__ import annotations

import contextlib
import gc
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.virtual_device import DEVICE, VirtualDevice, VirtualTensor, is_virtual

SAME_DEVICE = "Expected all tensors to be on the same device, but found at least two devices, lazy:0 and cpu!"
CALL = dict(
    prompt="a red fox walks in snow",
    negative_prompt="low quality",
    height=64,
    width=96,
    num_frames=13,
    num_inference_steps=2,
    output_type="np",
)


@pytest.fixture
def vd():
    with VirtualDevice() as device:
        yield device


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _global_state() -> tuple:
    return (
        hasattr(torch, "lazy"),
        "torch.lazy" in sys.modules,
        torch._C._only_lift_cpu_tensors(),
        torch._C._len_torch_function_stack(),
        torch._C._len_torch_dispatch_stack(),
        "_make_subclass" in torch.Tensor.__dict__,
    )


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _bytes_own(module: nn.Module) -> int:
    own = (*module.parameters(recurse=False), *module.buffers(recurse=False))
    return sum(t.numel() * t.element_size() for t in own)


# ------------------------------------------------------------------------------------------ install


def test_install_registers_the_device_and_restores_everything():
    before = _global_state()
    assert before == (False, False, False, 0, 0, False)
    for _ in range(2):  # re-entrant in one process
        with VirtualDevice() as vd:
            assert _global_state() == (True, True, True, 1, 1, True)
            assert torch.lazy is vd.module and torch.get_device_module(vd.device) is vd.module
            assert vd.device == torch.device("lazy", 0) == DEVICE
            with pytest.raises(RuntimeError, match="already installed"):
                VirtualDevice().__enter__()
        assert _global_state() == before
    with pytest.raises(ValueError, match="boom"), VirtualDevice():
        raise ValueError("boom")
    assert _global_state() == before


def test_tensors_left_on_the_device_fail_after_exit():
    with VirtualDevice() as vd:
        v = torch.ones(3).to(vd.device)
    with pytest.raises(RuntimeError, match="used after VirtualDevice exited"):
        v + v


# ------------------------------------------------------------------------------------------ tensors


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.bool, torch.float8_e4m3fn]
)
def test_to_device_and_back_keeps_every_dtype(vd, dtype):
    x = (torch.randn(4, 6) * 3).to(dtype)
    v = x.to(vd.device)
    assert type(v) is VirtualTensor and is_virtual(v) and not is_virtual(x)
    assert (v.device, v.dtype, v.shape) == (vd.device, dtype, x.shape)
    back = v.cpu()
    assert back.device.type == "cpu" and not is_virtual(back)
    assert torch.equal(back.view(torch.uint8), x.view(torch.uint8))  # bitwise, float8 included


def test_ops_compute_exactly_what_the_cpu_computes(vd):
    g = torch.Generator().manual_seed(0)
    x, w, img, k = (
        torch.randn(2, 5, 8, generator=g),
        torch.randn(16, 8, generator=g),
        torch.randn(1, 3, 9, 9),
        torch.randn(4, 3, 3, 3),
    )
    q = torch.randn(1, 2, 5, 8, generator=g)

    def compute(x, w, img, k, q):
        return (
            F.softmax(x @ w.t(), dim=-1),
            F.layer_norm(x, (8,)),
            F.conv2d(img, k, padding=1),
            F.scaled_dot_product_attention(q, q * 0.5, q),
            torch.cat([x, x * 2], dim=1)[:, ::2].sum(-1),
            F.gelu(x).to(torch.bfloat16),
        )

    cpu = compute(x, w, img, k, q)
    dev = compute(*(t.to(vd.device) for t in (x, w, img, k, q)))
    for a, b in zip(cpu, dev, strict=True):
        assert b.device == vd.device
        assert torch.equal(a, b.cpu())


@pytest.mark.parametrize(
    "op",
    [
        lambda v, c: v + c,
        lambda v, c: c * v,
        lambda v, c: torch.cat([v, c]),
        lambda v, c: v @ c.t(),
        lambda v, c: F.linear(c, v),
        lambda v, c: c.add_(v),
        lambda v, c: torch.where(v > 0, v, c),
        lambda v, c: torch.add(v, v, out=c),
        lambda v, c: torch.stack([v[0, 0], c[0, 0]]),  # a 0-dim CPU tensor outside a pointwise op
    ],
)
def test_mixing_devices_raises_cudas_error(vd, op):
    c = torch.randn(3, 3)
    with pytest.raises(RuntimeError, match=SAME_DEVICE.replace("!", "")):
        op(c.to(vd.device), c)


def test_zero_dim_cpu_tensors_pass_as_scalars_in_pointwise_ops(vd):
    x, s = torch.randn(3, 4), torch.tensor(2.5)
    v = x.to(vd.device)
    with vd.copies() as log:
        out = (v * s, torch.where(v > 0, v, torch.tensor(0.0)), v.masked_fill(v > 1, torch.tensor(-1.0)))
    assert log.records == []  # scalars travel as kernel arguments, not copies
    expected = (x * s, torch.where(x > 0, x, torch.tensor(0.0)), x.masked_fill(x > 1, torch.tensor(-1.0)))
    for a, b in zip(expected, out, strict=True):
        assert b.device == vd.device and torch.equal(a, b.cpu())


def test_cpu_indices_work_and_are_counted_as_copies(vd):
    x = torch.arange(12.0).view(4, 3)
    v = x.to(vd.device)
    idx, mask = torch.tensor([0, 2]), torch.tensor([True, False, True, False])
    with vd.copies() as log:
        rows, masked = v[idx], v[mask]
        v[idx] = torch.tensor(7.0)
    assert torch.equal(rows.cpu(), x[idx]) and torch.equal(masked.cpu(), x[mask])
    assert [(r.direction, r.shape, r.dtype) for r in log.records] == [
        ("h2d", (2,), torch.int64),
        ("h2d", (4,), torch.bool),
        ("h2d", (2,), torch.int64),
    ]
    assert torch.equal(v.cpu()[[0, 2]], torch.full((2, 3), 7.0))


def test_factories_make_device_tensors(vd):
    on_device = torch.ones(3).to(vd.device)
    with vd.copies() as log:
        made = [
            torch.zeros(2, 3, device=vd.device),
            torch.empty(4, device="lazy"),
            torch.full((2,), 3.0, device=vd.device),
            torch.arange(5, device=vd.device),
            torch.zeros_like(on_device),
            on_device.new_ones(2),
        ]
    assert all(type(t) is VirtualTensor and t.device == vd.device for t in made)
    assert log.records == []  # factories allocate on the device: nothing is copied
    with vd.copies() as log:
        t = torch.tensor([1, 2, 3], device=vd.device)  # built on the host, then copied, as on CUDA
    assert [(r.direction, r.shape, r.dtype) for r in log.records] == [("h2d", (3,), torch.int64)]
    assert t.device == vd.device and t.tolist() == [1, 2, 3]
    with pytest.raises(RuntimeError, match="invalid device ordinal"):
        torch.zeros(1, device="lazy:1")
    cpu = torch.randn(2, 3)  # a CPU tensor as a template only: allowed, as on CUDA
    for t in (
        torch.zeros_like(cpu, device=vd.device),
        torch.randn_like(cpu, device=vd.device),
        cpu.new_ones(4, device=vd.device),
    ):
        assert type(t) is VirtualTensor and t.device == vd.device


def test_host_conversions_copy_or_refuse_as_on_cuda(vd):
    import io

    v = torch.tensor([1.5, 2.0]).to(vd.device)
    with vd.copies() as log:
        assert (v.tolist(), v[0].item(), float(v[1]), f"{v[0]:.2f}") == ([1.5, 2.0], 1.5, 2.0, "1.50")
    assert [r.direction for r in log.records] == ["d2h"] * 4  # each is a device->host copy
    for convert in (v.numpy, lambda: np.asarray(v)):
        with pytest.raises(TypeError, match="can't convert lazy:0 device type tensor to numpy. Use Tensor.cpu()"):
            convert()
    with pytest.raises(NotImplementedError, match="torch.save"):
        torch.save(v, io.BytesIO())


def test_deepcopy_of_a_module_on_the_device(vd):
    import copy

    net = _Net().to(vd.device)
    before = vd.memory_allocated()
    twin = copy.deepcopy(net)
    assert twin.lin.weight is not net.lin.weight and isinstance(twin.lin.weight, nn.Parameter)
    assert all(t.device == vd.device for t in (*twin.parameters(), *twin.buffers()))
    assert torch.equal(twin.lin.weight.cpu(), net.lin.weight.cpu()) and vd.memory_allocated() == 2 * before
    twin.lin.weight.add_(1)
    assert not torch.equal(twin.lin.weight.cpu(), net.lin.weight.cpu())  # its own storage
    del twin
    gc.collect()
    assert vd.memory_allocated() == before


def test_generators_stay_on_the_cpu(vd):
    from diffusers.utils.torch_utils import randn_tensor

    with pytest.raises(RuntimeError, match="Expected a 'lazy' device type for generator but found 'cpu'"):
        torch.randn(3, generator=torch.Generator().manual_seed(0), device=vd.device)
    on_host = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), device="cpu").to(vd.device)
    via_diffusers = randn_tensor((2, 3), generator=torch.Generator().manual_seed(0), device=vd.device)
    expected = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    assert on_host.device == via_diffusers.device == vd.device
    assert torch.equal(on_host.cpu(), expected) and torch.equal(via_diffusers.cpu(), expected)
    # Device random ops use the device's generator, not the CPU's (as on CUDA).
    cpu_state = torch.get_rng_state()
    torch.lazy.manual_seed(5)
    a = torch.randn(4, device=vd.device)
    torch.lazy.manual_seed(5)
    b = torch.randn(4, device=vd.device)
    assert torch.equal(a.cpu(), b.cpu()) and torch.equal(torch.get_rng_state(), cpu_state)


# ------------------------------------------------------------------------------------------ accounting


def test_copies_are_recorded_with_shape_bytes_and_origin(vd):
    x = torch.randn(8, 4)
    with vd.copies() as outer:
        v = x.to(vd.device)  # h2d 128 B
        with vd.copies() as inner:
            back = v.cpu()  # d2h 128 B
            v.copy_(x[:1])  # h2d 16 B (broadcast source)
        back.copy_(v)  # d2h 128 B
        v.sum().item()  # d2h 4 B: .item() syncs and copies
    assert (outer.h2d_count, outer.h2d_bytes, outer.d2h_count, outer.d2h_bytes) == (2, 144, 3, 260)
    assert (inner.h2d_count, inner.h2d_bytes, inner.d2h_count, inner.d2h_bytes) == (1, 16, 1, 128)
    first = outer.records[0]
    assert (first.direction, first.shape, first.dtype, first.nbytes) == ("h2d", (8, 4), torch.float32, 128)
    assert first.origin.startswith("tests/test_virtual_device.py:") and "test_copies_are_recorded" in first.origin
    assert "h2d [8, 4] torch.float32 128 B via aten._to_copy.default at tests/test_virtual_device.py" in outer.summary()
    assert vd.log.h2d_count == 2 and vd.log.d2h_count == 3  # the device's own log saw them too
    vd.reset_copies()
    assert vd.log.records == []


def test_copy_regions_close_in_any_order_even_when_they_recorded_the_same(vd):
    x = torch.randn(3)
    outer = vd.copies()
    a = outer.__enter__()
    with vd.copies() as b:  # a and b record the same copies: equal logs, different regions
        x.to(vd.device)
    x.to(vd.device)
    outer.__exit__(None, None, None)
    assert (a.h2d_count, b.h2d_count) == (2, 1)
    x.to(vd.device)
    assert (a.h2d_count, b.h2d_count, vd.log.h2d_count) == (2, 1, 3)


def test_memory_counts_live_storages_once_and_tracks_the_peak(vd):
    mod = torch.lazy
    assert mod.memory_allocated() == vd.memory_allocated() == 0
    v = torch.empty(1024, device=vd.device)  # 4096 B
    view, alias = v[10:], v.view(32, 32)
    assert mod.memory_allocated() == 4096  # views share the storage
    w = torch.empty(256, device=vd.device, dtype=torch.float16)  # 512 B
    assert mod.memory_allocated() == 4608 and mod.max_memory_allocated() == 4608
    del v, alias
    assert mod.memory_allocated() == 4608  # `view` still holds the storage
    del view, w
    gc.collect()
    assert mod.memory_allocated() == 0 and mod.max_memory_allocated() == 4608
    mod.reset_peak_memory_stats()
    assert mod.max_memory_allocated() == 0
    free, total = mod.mem_get_info()
    assert (free, total) == (vd.capacity, vd.capacity)


def test_capacity_is_enforced_like_an_out_of_memory_device():
    with VirtualDevice(capacity=1000) as vd:
        a = torch.empty(200, device=vd.device)  # 800 B
        assert torch.lazy.mem_get_info() == (200, 1000)
        with pytest.raises(torch.OutOfMemoryError, match="out of memory"):
            torch.empty(100, device=vd.device)
        del a
        torch.empty(200, device=vd.device)


def test_device_module_answers_like_torch_cuda(vd):
    from diffusers.utils.torch_utils import TorchDeviceBackend

    mod = torch.lazy
    assert (mod.is_available(), mod.is_initialized(), mod.device_count(), mod.current_device()) == (True, True, 1, 0)
    mod.set_device(0)
    mod.set_device("lazy:0")
    with pytest.raises(RuntimeError, match="invalid device"):
        mod.set_device(1)
    mod.synchronize()
    mod.empty_cache()
    assert mod.calls == ["set_device", "set_device", "synchronize", "empty_cache"]
    assert mod.get_device_properties(0).total_memory == vd.capacity
    stream = mod.Stream()
    with mod.stream(stream):
        assert mod.current_stream() is stream
    assert mod.current_stream() is mod.default_stream()
    backend = TorchDeviceBackend(vd.device)  # diffusers' accessor for torch.<device type>
    backend.synchronize()
    backend.empty_cache()
    assert backend.memory_allocated() == 0 and mod.calls[-2:] == ["synchronize", "empty_cache"]


# ------------------------------------------------------------------------------------------ (a), (b) modules


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 4)
        self.register_buffer("scale", torch.full((4,), 2.0))
        self.register_buffer("shift", torch.arange(4.0), persistent=False)

    def forward(self, x):
        return self.lin(x) * self.scale + self.shift


def test_module_to_device_dtype_state_dict_and_back(vd):
    torch.manual_seed(0)
    net, x = _Net(), torch.randn(3, 6)
    expected = net(x)
    weight, nbytes = net.lin.weight, _bytes(net)
    net.to(vd.device)
    assert net.lin.weight is weight and type(weight) is nn.Parameter and weight.requires_grad
    assert {t.device for t in (*net.parameters(), *net.buffers())} == {vd.device}  # non-persistent too
    assert vd.memory_allocated() == nbytes
    assert torch.equal(net(x.to(vd.device)).cpu(), expected)
    state = net.state_dict()
    assert sorted(state) == ["lin.bias", "lin.weight", "scale"] and all(v.device == vd.device for v in state.values())
    del state
    net.to(torch.bfloat16)
    assert net.lin.weight is weight and weight.dtype == torch.bfloat16 and weight.device == vd.device
    assert vd.memory_allocated() == nbytes // 2
    net.to(torch.float32)
    with vd.copies() as log:
        net.load_state_dict({k: v + 1 for k, v in _Net().state_dict().items()})
    assert log.h2d_count == 3 and log.d2h_count == 0
    net.to("cpu")
    assert net.lin.weight is weight and type(weight) is nn.Parameter and weight.device.type == "cpu"
    assert {t.device.type for t in (*net.parameters(), *net.buffers())} == {"cpu"}
    gc.collect()
    assert vd.memory_allocated() == 0


def test_param_data_assignment_keeps_identity_class_and_attributes(vd):
    class TaggedParam(nn.Parameter):  # stands in for bnb's Int8Params / Params4bit
        pass

    p = TaggedParam(torch.randn(5))
    p.note = "kept"
    buf = torch.arange(3.0)
    original = p.detach().clone()
    with vd.copies() as log:
        p.data = p.data.to(vd.device)  # diffusers' group offloading does exactly this
        buf.data = buf.data.to(vd.device)
    assert (type(p), p.device, p.requires_grad, p.note) == (TaggedParam, vd.device, True, "kept")
    assert is_virtual(p) and is_virtual(buf) and type(buf) is torch.Tensor and log.h2d_bytes == 20 + 12
    assert torch.equal((p * 2).cpu(), original * 2)
    with pytest.raises(RuntimeError, match=SAME_DEVICE.replace("!", "")):
        p + original
    p.data = p.data.to("cpu")
    buf.data = buf.data.to("cpu")
    assert (type(p), p.device, p.note) == (TaggedParam, torch.device("cpu"), "kept") and not is_virtual(p)
    assert torch.equal(p.detach(), original) and buf.device.type == "cpu"
    gc.collect()
    assert vd.memory_allocated() == 0


def test_autograd_runs_on_the_device(vd):
    with torch.enable_grad():
        torch.manual_seed(0)
        net, x = nn.Linear(4, 3), torch.randn(2, 4)
        net(x).square().sum().backward()
        expected = net.weight.grad.clone()
        net.weight.grad = None
        net.to(vd.device)
        net(x.to(vd.device)).square().sum().backward()
    assert net.weight.grad.device == vd.device and torch.equal(net.weight.grad.cpu(), expected)


# ------------------------------------------------------------------------------------------ (c)-(g) libraries


def _sd3(num_layers: int = 4):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=num_layers,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=64,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=16,
    ).eval()


def _sd3_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(1, 4, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([3.0]),
    )


def _run(model, device=None) -> torch.Tensor:
    inputs = {k: v.to(device) if device else v for k, v in _sd3_inputs().items()}
    return model(**inputs, return_dict=False)[0]


def test_group_offloading_block_and_leaf_level_lower_the_peak(vd):
    from diffusers.hooks import apply_group_offloading

    expected = _run(_sd3())
    peaks = {}
    for kind in ("whole", "block_level", "leaf_level"):
        model = _sd3()
        if kind == "whole":
            model.to(vd.device)
        else:
            apply_group_offloading(
                model,
                onload_device=vd.device,
                offload_device=torch.device("cpu"),
                offload_type=kind,
                num_blocks_per_group=1 if kind == "block_level" else None,
                use_stream=False,
            )
        vd.reset_peak_memory_stats()
        with vd.copies() as log:
            out = _run(model, vd.device)
        peaks[kind] = torch.lazy.max_memory_allocated()
        assert out.device == vd.device and torch.equal(out.cpu(), expected), kind
        if kind != "whole":
            assert {p.device.type for p in model.parameters()} == {"cpu"}  # offloaded again after forward
            assert log.h2d_bytes >= _bytes(model)  # every weight went up once
        del model, out
        gc.collect()
    assert peaks["leaf_level"] < peaks["block_level"] < peaks["whole"] / 2, peaks


def test_group_offloading_with_streams_needs_pinned_memory(vd):
    """use_stream=True pins CPU memory (group_offloading.py `_to_cpu`: t.pin_memory()), which a CPU-only torch
    refuses: recorded here, not emulated. (Once the NPU stand-in has named PrivateUse1, torch asks that
    backend instead and fails with its own message.)"""
    from diffusers.hooks import apply_group_offloading

    refused = "Cannot access accelerator device when none is available|register PrivateUse1HooksInterface"
    with pytest.raises(RuntimeError, match=refused) as caught:
        apply_group_offloading(
            _sd3(num_layers=1),
            onload_device=vd.device,
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=True,
        )
    assert any(entry.name == "_to_cpu" for entry in caught.traceback)


def test_pinned_memory_when_asked():
    """pinned_memory=True (the virtual npu: torch_npu pins host memory): a pinned CPU copy, remembered as pinned."""
    x = torch.randn(3, 4).t()
    with VirtualDevice(pinned_memory=True) as vd:
        pinned = x.pin_memory()
        assert pinned.device.type == "cpu" and torch.equal(pinned, x) and pinned.is_contiguous()
        assert pinned.is_pinned() and not x.is_pinned() and pinned.pin_memory() is pinned
        assert not pinned.to(vd.device).is_pinned()
        assert vd.log.h2d_count == 1


def test_device_type_is_lazy_or_privateuse1():
    with pytest.raises(ValueError, match="PrivateUse1"):
        VirtualDevice(device_type="cuda")


def test_layerwise_casting_stores_float8_on_the_device(vd):
    model = _sd3()
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    expected = _run(model)
    model.to(vd.device)
    fp8 = [p for p in model.parameters() if p.dtype == torch.float8_e4m3fn]
    assert fp8 and all(p.device == vd.device for p in fp8)
    assert vd.memory_allocated() == _bytes(model)  # 1 byte per float8 element
    out = _run(model, vd.device)
    assert torch.equal(out.cpu(), expected)
    assert all(p.dtype == torch.float8_e4m3fn for p in fp8)  # cast back to storage after forward


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).eval()


def test_torchao_int8_weight_only_quantized_on_cpu_runs_on_the_device(vd):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    x = torch.randn(4, 64)
    ref = _mlp()
    quantize_(ref, Int8WeightOnlyConfig(set_inductor_config=False))
    model = _mlp()
    quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False))
    cls = type(model[0].weight)
    model.to(vd.device)
    weight = model[0].weight
    assert type(weight) is cls and cls.__module__.startswith("torchao") and weight.device == vd.device
    assert all(is_virtual(getattr(weight, name)) for name in cls.tensor_data_names)  # qdata, scale
    out = model(x.to(vd.device))
    assert out.device == vd.device and torch.equal(out.cpu(), ref(x))


def generic_path(layer: nn.Module) -> nn.Module:
    """Like with like: on a CPU with AVX512-BF16, Linear4bit.forward on a CPU tensor repacks its weight in place
    for a fused kernel that rounds the input to bf16 (bitsandbytes' backends/cpu/ops.py gemv_4bit); a virtual
    device tensor is not a CPU tensor, so the device takes the generic path (dequantize_4bit, then F.linear) that
    every other CPU takes. The CPU reference takes that path too (backends/memory.py's NF4Linear does the same
    for every layer whose compute dtype is not bf16)."""
    layer.support_avx512bf16_for_cpu = False
    return layer


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_bitsandbytes_runs_its_cpu_kernels_on_the_device(vd, kind):
    bnb = pytest.importorskip("bitsandbytes")

    def make():
        torch.manual_seed(0)
        if kind == "int8":
            return bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False).eval()
        return generic_path(bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4").eval())

    x = torch.randn(4, 64)
    ref = make().to("cpu")  # .to() is where bnb quantizes
    expected = ref(x)
    model = make()
    cls = type(model.weight)
    with vd.copies() as log:
        model.to(vd.device)
    assert type(model.weight) is cls and model.weight.device == vd.device
    assert model.weight.dtype == (torch.int8 if kind == "int8" else torch.uint8)
    assert log.h2d_count >= 1 and log.d2h_count == 0  # quantized on the device from the uploaded weight
    out = model(x.to(vd.device))
    assert out.device == vd.device and torch.equal(out.cpu(), expected)


def test_library_caches_forget_device_tensors_on_exit():
    """bitsandbytes caches its nested-quantization code table on the device of first use; after exit a CPU
    quantization must not meet a dead device tensor."""
    bnb = pytest.importorskip("bitsandbytes")
    bnb.functional.name2qmap.pop("dynamic", None)
    with VirtualDevice() as vd:
        bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4").to(vd.device)  # nested: the table
        assert is_virtual(bnb.functional.name2qmap["dynamic"])
    layer = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    assert layer.weight.device.type == "cpu" and layer.weight.quant_state.nested


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_bitsandbytes_layers_quantized_on_the_cpu_move_to_the_device_and_back(vd, kind):
    """The runtime's order: quantize on the CPU, place later. Moving an already-quantized weight re-wraps it
    (`Int8Params(t.to(device))`, `Params4bit(...)`), i.e. `_make_subclass` on a device tensor."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    if kind == "int8":
        model = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False, threshold=6.0).eval()
    else:
        model = generic_path(bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4").eval())
    model.to("cpu")  # quantizes
    weight, stored = model.weight, model.weight.detach().clone()
    x = torch.randn(4, 64)
    expected = model(x)
    with vd.copies() as log:
        model.to(vd.device)
    assert model.weight is weight and type(weight).__module__.startswith("bitsandbytes")
    assert weight.device == vd.device and is_virtual(weight) and log.h2d_bytes >= stored.numel()
    out = model(x.to(vd.device))
    assert out.device == vd.device and torch.equal(out.cpu(), expected)
    model.to("cpu")
    assert model.weight is weight and weight.device.type == "cpu" and torch.equal(weight.detach(), stored)


# ------------------------------------------------------------------------------------------ (d), (h) ContentV


def _load(path: str):
    from contentv.attention import sdpa
    from contentv.models.contentv import SPEC
    from contentv.models.contentv.pipeline import ContentVPipeline

    pipe = ContentVPipeline.from_pretrained(path, torch_dtype=torch.float32)
    SPEC.install_attention(pipe, sdpa)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, **kw) -> np.ndarray:
    return pipe(**CALL, generator=torch.Generator().manual_seed(0), **kw).frames


def _to_device(pipe, device) -> None:
    pipe.execution_device = device
    for component in pipe.components.values():
        if isinstance(component, nn.Module):
            component.to(device)


def _modules(pipe) -> list[nn.Module]:
    return [c for c in pipe.components.values() if isinstance(c, nn.Module)]


@pytest.fixture(scope="module")
def cpu_call_frames(tiny_ckpt) -> np.ndarray:
    """The same pipeline call on the CPU (a call, not a run: the conftest's cpu_frames are runs')."""
    return _generate(_load(tiny_ckpt))


@pytest.fixture(scope="module")
def device_run(tiny_ckpt, cpu_call_frames) -> dict:
    """One pipeline call with every component on the virtual device: frames, peak, and the copies made,
    per stage (text_encoding, denoising, decoding) and per transformer forward."""
    stages: dict[str, object] = {}
    calls: list[object] = []
    with VirtualDevice() as vd:

        @contextlib.contextmanager
        def stage(name):
            with vd.copies() as log:
                stages[name] = log
                yield

        pipe = _load(tiny_ckpt)
        _to_device(pipe, vd.device)
        regions = contextlib.ExitStack()
        pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(regions.enter_context(vd.copies())))
        pipe.transformer.register_forward_hook(lambda *_: regions.close())
        vd.reset_copies()
        vd.reset_peak_memory_stats()
        frames = _generate(pipe, stage_context=stage)
        return dict(frames=frames, stages=stages, calls=calls, log=vd.log, peak=vd.max_memory_allocated())


def test_contentv_pipeline_on_the_device_equals_cpu(device_run, cpu_call_frames):
    frames, stages, calls = device_run["frames"], device_run["stages"], device_run["calls"]
    assert frames.shape == (1, 13, 64, 96, 3)
    # Not bit-exact: device copies are 64-byte aligned, and text_encoder_2's projection weight is loaded at a
    # 24-byte offset on the CPU, so BLAS rounds one ulp differently there (the transformer and VAE are exact).
    assert np.abs(frames - cpu_call_frames).max() <= 1e-5
    assert len(calls) == CALL["num_inference_steps"]  # batched guidance: one forward per step
    assert all(c.d2h_count == 0 for c in calls), "a sync inside the transformer forward"
    assert stages["decoding"].d2h_count == 1  # the frames, for numpy
    # Only inputs go up during a call (token ids, noise, sigmas, small tables), never weights (~10 MB).
    assert device_run["log"].h2d_bytes < 200_000, device_run["log"].summary()


def test_contentv_transformer_forward_makes_no_host_to_device_copy(device_run):
    calls = device_run["calls"]
    assert len(calls) == CALL["num_inference_steps"]
    assert all(c.h2d_count == 0 for c in calls), "\n".join(c.summary() for c in calls)


def test_contentv_decoding_makes_no_host_to_device_copy(device_run):
    assert device_run["stages"]["decoding"].h2d_count == 0, device_run["stages"]["decoding"].summary()


@pytest.mark.parametrize("kind", ["model", "sequential"])
def test_accelerate_offload_with_an_explicit_device(vd, tiny_ckpt, cpu_call_frames, device_run, kind):
    from diffusers import DiffusionPipeline

    pipe = _load(tiny_ckpt)
    total = sum(_bytes(m) for m in _modules(pipe))
    if kind == "model":
        pipe.enable_model_cpu_offload(device=vd.device)
    else:
        DiffusionPipeline.enable_sequential_cpu_offload(pipe, device=vd.device)
    assert pipe._execution_device == vd.device
    vd.reset_peak_memory_stats()
    frames = _generate(pipe)
    assert np.abs(frames - cpu_call_frames).max() <= 1e-5
    assert vd.log.h2d_bytes >= total  # every weight was uploaded during the call
    where = {p.device.type for m in _modules(pipe) for p in m.parameters()}
    assert where == ({"cpu"} if kind == "model" else {"meta"})  # and is off the device after it
    # Activations are the same in every mode, so: peak <= (whole-device peak - all weights) + what may be
    # resident at once, one component (model offload) or one leaf module's own tensors (sequential).
    if kind == "model":
        resident = max(_bytes(m) for m in _modules(pipe))  # text_encoder_3, 6.8 MB
    else:
        resident = max(_bytes_own(m) for c in _modules(pipe) for m in c.modules())  # T5's embedding, 4.1 MB
    bound = device_run["peak"] - total + resident
    assert torch.lazy.max_memory_allocated() <= bound < device_run["peak"], (torch.lazy.max_memory_allocated(), bound)


@pytest.mark.slow
def test_contentv_pipeline_overhead_is_a_few_times_cpu(tiny_ckpt, cpu_call_frames):
    """min of two runs each, interleaved, so load from other processes hits both sides alike."""
    pipe = _load(tiny_ckpt)
    cpu, dev = [], []
    for _ in range(2):
        start = time.perf_counter()
        _generate(pipe)
        cpu.append(time.perf_counter() - start)
        with VirtualDevice() as vd:
            _to_device(pipe, vd.device)
            start = time.perf_counter()
            _generate(pipe)
            dev.append(time.perf_counter() - start)
            _to_device(pipe, torch.device("cpu"))
            pipe.execution_device = None
    ratio = min(dev) / min(cpu)
    print(f"virtual/cpu time: {min(dev):.3f}s / {min(cpu):.3f}s = {ratio:.2f}")
    assert ratio < 5, ratio
