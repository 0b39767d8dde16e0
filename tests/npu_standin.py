"""A strict CPU stand-in for `torch_npu`: the NPU backend's contract, tested without Ascend hardware.

`install(monkeypatch)` (or the `npu_standin` fixture) puts a `types.ModuleType("torch_npu")` with a real `__spec__`
into `sys.modules`, a recording `torch.npu` onto torch, and names torch's PrivateUse1 device "npu". The module has
no package metadata, no `__file__` and no `__version__`, so diffusers (metadata-based, decided at import) and
transformers (which treats a module without file or version as absent) still report no NPU.

The two attention ops are neither stricter nor looser than the real ones:
- Signatures come from the op schema excerpt in tests/npu_schema/ops.yaml (verbatim from the torch-npu wheel),
  defined once per process under the torch.library namespace `npu_standin`, so torch's own argument parser binds
  each call exactly as it binds the real `torch.ops.npu.*`: same positional/keyword rules, type checks, RuntimeError.
- Value rules follow op_plugin's checks and the wheel's op docs (torch_npu/_op_plugin_docs.py); each says where it
  comes from. What the real op rejects raises StandInError (a RuntimeError, as TORCH_CHECK does); what it accepts but
  this stand-in does not compute raises NotModelled, so a gap is never mistaken for a rule.
- Tensors must be on the NPU: `StandIn.is_on_device` is the one device check. On a CPU build, real "npu" tensors
  come from the virtual device (tests/virtual_device.py with device_type="npu"), which sets that hook to its
  `holds` (the op's kernel sees the device tensors' CPU data); tests that only want numbers set it to accept
  CPU tensors instead (`npu_cpu` in tests/test_npu.py). The math runs on CPU copies and comes back on the input's
  device.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import inspect
import itertools
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

SCHEMA_FILE = Path(__file__).resolve().parent / "npu_schema" / "ops.yaml"
NAMESPACE = "npu_standin"  # not "npu": a real torch_npu in the same process owns that one
MAX_TOKENS = 2147483647
COMPRESSED = 2048  # side of the compressed causal mask template sparse modes 2-4 take


class StandInError(RuntimeError):
    """What the real op raises (torch_npu reports bad arguments through TORCH_CHECK, a RuntimeError)."""


class NotModelled(NotImplementedError):
    """The real op accepts this, but the stand-in does not compute it: extend the stand-in, don't rely on it."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise StandInError(message)


def _not_modelled(unmodelled: bool, what: str) -> None:
    if unmodelled:
        raise NotModelled(f"the torch_npu stand-in does not model {what}")


# ------------------------------------------------------------------------------------------ the schema


def load_schemas(path: Path = SCHEMA_FILE) -> dict[str, str]:
    """op name -> schema string, from the excerpt's `custom` section (the op's definition; `symint` repeats it)."""
    data = yaml.safe_load(path.read_text())
    return {entry["func"].split("(")[0]: entry["func"] for entry in data["custom"]}


def signature_of(schema: str) -> inspect.Signature:
    """The Python signature of an ATen schema (torch's own parser): names, order, defaults, `*` = keyword-only."""
    parsed = torch._C.parse_schema(f"{NAMESPACE}::{schema}")
    kinds = {False: inspect.Parameter.POSITIONAL_OR_KEYWORD, True: inspect.Parameter.KEYWORD_ONLY}
    return inspect.Signature(
        [
            inspect.Parameter(
                a.name,
                kinds[a.kwarg_only],
                default=a.default_value if a.has_default_value() else inspect.Parameter.empty,
                annotation=str(a.type),
            )
            for a in parsed.arguments
        ],
        return_annotation="(" + ", ".join(str(r.type) for r in parsed.returns) + ")",
    )


# Where the wheel's docs disagree, the schema wins for the signature: the docs list npu_fusion_attention without
# sink, dropout_mask, seed, offset, and the fused-infer keywords in another order (block_table before the
# key/value_antiquant_* ones, softmax_lse_flag before key_antiquant_mode). The docs win for value rules.
SCHEMAS = load_schemas()
SIGNATURES = {name: signature_of(schema) for name, schema in SCHEMAS.items()}

_library: torch.library.Library | None = None
_running: list = []  # the implementation behind the op call in progress (innermost last)


def _ops():
    """The excerpt's ops under torch.ops.npu_standin, defined once per process (torch.library is process-wide)."""
    global _library
    if _library is None:
        library = torch.library.Library(NAMESPACE, "DEF")
        for name, schema in SCHEMAS.items():
            library.define(schema)
            library.impl(name, _kernel(name), "CompositeExplicitAutograd")
        _library = library
    return getattr(torch.ops, NAMESPACE)


def _kernel(name: str):
    def kernel(*args, **kwargs):
        bound = SIGNATURES[name].bind(*args, **kwargs)  # torch hands over only the arguments not at their default
        bound.apply_defaults()
        return _running[-1](types.SimpleNamespace(**bound.arguments))

    return kernel


# ------------------------------------------------------------------------------------------ torch.npu


class _npuConfig:  # the real class's name: reading fails with the real message
    """torch.npu.config: write-only (torch_npu/npu/npu_config.py: a __setattr__ that forwards to
    _npu_setOption and stores nothing; no __getattr__, so reading raises AttributeError)."""

    def __init__(self, owner: FakeNPUModule):
        object.__setattr__(self, "_owner", owner)

    def __setattr__(self, name, value):
        if name == "allow_internal_format":
            self._owner._set_option({"ALLOW_INTERNAL_FORMAT": "enable" if value else "disable"})


class _HF32Switch:
    """torch.npu.matmul / torch.npu.conv: `allow_hf32` must be a bool (TypeError otherwise) and is kept as an
    option; unset, matmul reads False and conv True (npu_config.py _allowHF32Matmul / _allowHF32Conv). Other names
    read None and are not stored."""

    def __init__(self, owner: FakeNPUModule, option: str, default: bool):
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_option", option)
        object.__setattr__(self, "_default", default)

    def __setattr__(self, name, value):
        if name == "allow_hf32":
            if not isinstance(value, bool):
                raise TypeError(f"allow_hf32 must be a bool, but got {type(value).__name__}")
            self._owner._set_option({self._option: "enable" if value else "disable"})

    def __getattr__(self, name):
        if name == "allow_hf32":
            value = self._owner.options.get(self._option)
            return self._default if value in (None, "") else value == "enable"
        return None


_PRIVATEUSE1 = int(torch._C._autograd.DeviceType.PrivateUse1)  # the device type torch_npu's streams report


class _Stream(torch.Stream):
    """torch_npu.npu.Stream(device=None, priority=0, **kwargs) (torch_npu/npu/streams.py); no real queue.

    A `torch.Stream`, as the real one is (its base, torch_npu/csrc/npu/Stream.h's THNPStream, extends THPStream),
    so torch's own stream arguments take it: `Tensor.record_stream(torch.npu.current_stream())` does in diffusers'
    group offloading with streams. `device`, `device_index` and `device_type` (an int) are torch.Stream's."""

    _owner: FakeNPUModule  # set on each module's own subclass
    _ids = itertools.count(1)  # distinct stream ids

    def __new__(cls, device=None, priority=0, **kwargs):
        owner = cls._owner
        owner._lazy_init()
        return super().__new__(
            cls, stream_id=next(cls._ids), device_index=owner._index(device), device_type=_PRIVATEUSE1
        )

    def __init__(self, device=None, priority=0, **kwargs):
        self.priority = priority
        self._owner._record("Stream", device, priority=priority, **kwargs)

    def synchronize(self) -> None:
        self._owner._record("Stream.synchronize", self.device_index)

    def query(self) -> bool:
        return True

    def wait_stream(self, stream) -> None:
        self._owner._record("Stream.wait_stream", self.device_index, stream.device_index)

    def wait_event(self, event) -> None:
        event.wait(self)

    def record_event(self, event=None):
        event = self._owner.Event() if event is None else event
        event.record(self)
        return event


class _Event:
    """torch_npu.npu.Event(enable_timing=False, blocking=False, interprocess=False)."""

    _owner: FakeNPUModule

    def __init__(self, enable_timing=False, blocking=False, interprocess=False):
        self.enable_timing, self.blocking, self.interprocess = enable_timing, blocking, interprocess

    def record(self, stream=None) -> None:
        self._owner._record("Event.record", stream)

    def wait(self, stream=None) -> None:
        self._owner._record("Event.wait", stream)

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        self._owner._record("Event.synchronize")


class FakeNPUModule:
    """`torch.npu` as torch_npu provides it, the members the backend, diffusers and accelerate use (signatures as
    in torch_npu/npu/*.py). Every call is recorded in `calls` as (name, args, kwargs); switches land in `options`,
    as torch_npu._C._npu_setOption receives them, so tests can assert what the backend set."""

    def __init__(self, available: bool = True, device_count: int = 1):
        self.available = available
        self.count = device_count
        self.calls: list[tuple[str, tuple, dict]] = []
        self.options: dict[str, str] = {}
        self.initialized = False
        self.device_index = 0
        self.peak = 1234  # bytes: max_memory_allocated
        self.allocated = 1000  # bytes: memory_allocated
        self.reserved = 2 << 30  # bytes: memory_reserved (held by the caching allocator, reusable)
        self.free, self.total = 60 << 30, 64 << 30  # bytes: mem_get_info
        self.name = "Ascend910B3 (stand-in)"  # get_device_name: an Atlas A2 unless a test says otherwise
        self.config = _npuConfig(self)
        self.matmul = _HF32Switch(self, "ALLOW_MATMUL_HF32", default=False)
        self.conv = _HF32Switch(self, "ALLOW_CONV_HF32", default=True)
        self.Stream = type("Stream", (_Stream,), {"_owner": self})
        self.Event = type("Event", (_Event,), {"_owner": self})

    def _record(self, name: str, *args, **kwargs) -> None:
        self.calls.append((name, args, kwargs))

    def called(self, name: str) -> list[tuple[tuple, dict]]:
        return [(a, k) for n, a, k in self.calls if n == name]

    def _set_option(self, option: dict[str, str]) -> None:
        self._record("_npu_setOption", option)
        self.options.update(option)

    def _lazy_init(self) -> None:
        self.initialized = True

    def _index(self, device) -> int:
        """torch_npu's _get_device_index(device, optional=True): None or a negative int means the current device."""
        if isinstance(device, str):
            device = torch.device(device)
        if isinstance(device, torch.device):
            if device.type != "npu":
                raise ValueError(f"Expected a npu device, but got: {device}")
            device = device.index
        return self.device_index if device is None or device < 0 else int(device)

    # device
    def is_available(self) -> bool:
        self._record("is_available")
        return self.available

    def device_count(self) -> int:
        self._record("device_count")
        return self.count

    def is_initialized(self) -> bool:
        return self.initialized

    def set_device(self, device) -> None:
        self._record("set_device", device)
        self._lazy_init()  # selecting a device initializes it, as torch.cuda.set_device does
        self.device_index = self._index(device)

    def current_device(self) -> int:
        self._lazy_init()
        return self.device_index

    def get_device_name(self, device_name=None) -> str:
        self._record("get_device_name", device_name)
        if not 0 <= self._index(device_name) < self.count:
            raise AssertionError("Invalid device id")
        return self.name

    def synchronize(self, device=None) -> None:
        self._record("synchronize", device)
        self._lazy_init()

    # switches
    def set_compile_mode(self, jit_compile=False):  # unannotated, as torch_npu's (signature compared in tests)
        self._record("set_compile_mode", jit_compile=jit_compile)
        if self.is_initialized():  # torch_npu drains the queue before switching
            self.synchronize()
        self._set_option({"jitCompile": "enable" if jit_compile else "disable"})

    # memory
    def mem_get_info(self, device=None) -> tuple[int, int]:
        self._record("mem_get_info", device)
        self._lazy_init()
        return self.free, self.total

    def memory_allocated(self, device=None) -> int:
        self._record("memory_allocated", device)
        return self.allocated

    def max_memory_allocated(self, device=None) -> int:
        self._record("max_memory_allocated", device)
        return self.peak

    def memory_reserved(self, device=None) -> int:
        self._record("memory_reserved", device)
        return self.reserved

    def reset_peak_memory_stats(self, device=None) -> None:
        self._record("reset_peak_memory_stats", device)

    def empty_cache(self) -> None:
        self._record("empty_cache")

    # streams
    def current_stream(self, device=None):
        self._lazy_init()
        return self.Stream(device)

    def default_stream(self, device=None):
        self._lazy_init()
        return self.Stream(device)

    def set_stream(self, stream) -> None:
        self._record("set_stream", stream)

    @contextlib.contextmanager
    def stream(self, stream):
        self._record("stream", stream)
        yield

    # seeding: torch.manual_seed also seeds the PrivateUse1 device's module (this one) through the last two.
    def manual_seed(self, seed) -> None:
        self._record("manual_seed", int(seed))

    def manual_seed_all(self, seed) -> None:
        self._record("manual_seed_all", int(seed))

    def _is_in_bad_fork(self) -> bool:
        return False


# ------------------------------------------------------------------------------------------ attention math


def _to_bnsd(x: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    """A tensor in `layout` (query's layout for BNSD_BSND) -> (B, N, S, D)."""
    if layout in ("BNSD", "BNSD_BSND"):
        return x
    if layout == "BSND":
        return x.transpose(1, 2)
    if layout == "SBH":
        x = x.transpose(0, 1)
    b, s, h = x.shape
    return x.reshape(b, s, heads, h // heads).transpose(1, 2)


def _from_bnsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, N, S, D) -> the output layout: the input's, except BNSD_BSND, which returns BSND."""
    b, n, s, d = x.shape
    if layout == "BNSD":
        out = x
    elif layout in ("BSND", "BNSD_BSND"):
        out = x.transpose(1, 2)
    elif layout == "BSH":
        out = x.transpose(1, 2).reshape(b, s, n * d)
    else:  # SBH
        out = x.transpose(1, 2).reshape(b, s, n * d).transpose(0, 1)
    return out.contiguous()


def _band(sq: int, skv: int, pre: int, nxt: int, shift: int) -> torch.Tensor:
    """Keep-mask (Sq, Skv): query i sees key j when -pre <= j - i - shift <= nxt (shift 0: from the top-left
    corner; Skv - Sq: from the bottom-right one)."""
    offset = torch.arange(skv)[None, :] - torch.arange(sq)[:, None] - shift
    return (offset >= -pre) & (offset <= nxt)


def _compressed(op: str, mask: torch.Tensor, shapes: tuple) -> None:
    """Sparse modes 2-4 take the 2048x2048 "compressed" upper-triangular mask as a template, not as the mask."""
    _require(tuple(mask.shape) in shapes, f"{op}: atten_mask shape {tuple(mask.shape)} must be one of {shapes}")
    template = torch.ones(COMPRESSED, COMPRESSED, dtype=torch.bool).triu(1)
    # Any other content gives undefined results on the device (docs: "需要用户保证传入的atten_mask为下三角").
    _not_modelled(not torch.equal(mask.cpu().reshape(COMPRESSED, COMPRESSED) != 0, template), "a non-template mask")


def _attend(q4, k4, v4, scale: float, keep):
    """fp32 attention on (B, N, S, D) CPU views; GQA by repeating key/value heads. -> out, row max, row sum."""
    q4, k4, v4 = (t.float() for t in (q4, k4, v4))
    group = q4.shape[1] // k4.shape[1]
    k4, v4 = k4.repeat_interleave(group, 1), v4.repeat_interleave(group, 1)
    scores = (q4 @ k4.transpose(-1, -2)) * scale
    if keep is not None:
        # A row with every key masked is undefined on the device (inner_precise=2 "无效行" correction aside).
        _not_modelled(bool((~keep.expand_as(scores)).all(-1).any()), "rows whose keys are all masked out")
        scores = scores.masked_fill(~keep, float("-inf"))
    out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=keep, scale=scale)
    row_max = scores.amax(-1, keepdim=True)
    row_sum = (scores - row_max).exp().sum(-1, keepdim=True)
    return out, row_max, row_sum


# ------------------------------------------------------------------------------------------ the module


class StandIn:
    """The `torch_npu` stand-in and its recorder: `calls` holds (op, what it was called with) per attention call."""

    FUSION_LAYOUTS = ("BSH", "SBH", "BNSD", "BSND")
    FUSED_INFER_LAYOUTS = ("BSH", "BSND", "BNSD", "BNSD_BSND")

    def __init__(self, available: bool = True, device_count: int = 1):
        self.calls: list[tuple[str, dict]] = []
        self.npu = FakeNPUModule(available, device_count)
        module = types.ModuleType("torch_npu")
        # A real spec: importlib.util.find_spec("torch_npu") returns it (a None spec would raise ValueError).
        module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
        for name, impl in (
            ("npu_fusion_attention", self._fusion_attention),
            ("npu_fused_infer_attention_score", self._fused_infer_attention_score),
        ):
            op = self._op(name, impl)
            setattr(self, name, op)
            setattr(module, name, op)
        module.npu = self.npu
        module.standin = self
        self.module = module

    def is_on_device(self, tensor: torch.Tensor) -> bool:
        """The device check of both ops: is this tensor on the NPU? (the virtual npu replaces it by `vd.holds`)"""
        return tensor.device.type == "npu"

    def _op(self, name: str, impl):
        """torch_npu.<name>: the op, bound by torch's parser against the excerpt's schema, computed by `impl`."""
        packet = getattr(_ops(), name)

        def op(*args, **kwargs):
            _running.append(impl)
            try:
                return packet(*args, **kwargs)
            finally:
                _running.pop()

        op.__name__ = op.__qualname__ = name
        op.__signature__ = SIGNATURES[name]
        op.__doc__ = f"torch_npu.{SCHEMAS[name]}"
        return op

    def _dispatch(self, op: str, tensors: dict) -> None:
        """The dispatcher runs the NPU kernel only if some tensor argument is on the NPU."""
        given = [t for t in tensors.values() if t is not None]
        if not any(self.is_on_device(t) for t in given):
            backend = given[0].device.type.upper()
            raise NotImplementedError(f"Could not run 'npu::{op}' with arguments from the '{backend}' backend.")

    def _placed(self, op: str, tensors: dict) -> torch.device:
        """op_plugin's format_trans rejects every tensor not on the NPU. -> the device of the outputs."""
        strays = [name for name, t in tensors.items() if t is not None and not self.is_on_device(t)]
        _require(not strays, f"{op}: only npu tensor is supported ({', '.join(strays)} not on the NPU)")
        return tensors["query"].device

    # -------------------------------------------------------------------------- npu_fusion_attention

    def _fusion_attention(self, a) -> tuple:
        op = "npu_fusion_attention"
        q, k, v = a.query, a.key, a.value
        tensors = dict(query=q, key=k, value=v, pse=a.pse, padding_mask=a.padding_mask, atten_mask=a.atten_mask)
        tensors.update(sink=a.sink, dropout_mask=a.dropout_mask)
        self._dispatch(op, tensors)
        # op_plugin FlashAttentionKernelNpuOpApi.cpp, in its order: ranks, keep_prob, sparse_mode, layout.
        for name, t in (("query", q), ("key", k), ("value", v)):
            _require(
                t.dim() in (3, 4), f"The shapes of the input {name} should be 3 or 4 dimensional, but got {t.dim()}"
            )
        _require(0 < a.keep_prob <= 1, f"The keep_prob value must be in range of (0, 1], but got {a.keep_prob}")
        if a.input_layout == "TND":  # compared before upper-casing there
            _require(
                a.sparse_mode in (0, 1, 2, 3, 4, 6, 7, 8),
                f"The sparse_mode value must be in range of [0,5) or (5,8], but got {a.sparse_mode}",
            )
            _require(
                bool(a.actual_seq_qlen)
                and bool(a.actual_seq_kvlen)
                and len(a.actual_seq_qlen) == len(a.actual_seq_kvlen),
                "the size of actual_seq_qlen and actual_seq_kvlen must be the same and cannot be empty.",
            )
        else:
            _require(
                0 <= a.sparse_mode <= 6, f"The sparse_mode value must be in range of [0,6], but got {a.sparse_mode}"
            )
        layout = a.input_layout.upper()  # op_plugin upper-cases it: "(case-insensitive)"
        _require(
            layout in (*self.FUSION_LAYOUTS, "TND"),
            f"The input_layout should be BSH/SBH/BNSD/BSND/TND(case-insensitive), but got {a.input_layout}",
        )
        device = self._placed(op, tensors)
        _not_modelled(layout == "TND", "the TND (variable-length) layout")
        _not_modelled(a.keep_prob < 1, "dropout (keep_prob < 1): the device's Philox mask can't be reproduced")
        unmodelled = dict(pse=a.pse, padding_mask=a.padding_mask, prefix=a.prefix, sink=a.sink)
        unmodelled.update(dropout_mask=a.dropout_mask, actual_seq_qlen=a.actual_seq_qlen)
        unmodelled.update(actual_seq_kvlen=a.actual_seq_kvlen)
        for name, value in unmodelled.items():
            _not_modelled(value is not None, f"{op}({name}=...)")
        _not_modelled(a.softmax_layout != "", "softmax_layout (TND only)")

        # Documented constraints (_op_plugin_docs.py, npu_fusion_attention, 参数说明/约束说明).
        # fp32 included ("数据类型支持float16、bfloat16、float32"; CANN >= 8.0).
        dtypes = (torch.float16, torch.bfloat16, torch.float32)
        _require(q.dtype in dtypes, f"{op}: query dtype {q.dtype} (float16, bfloat16 or float32)")
        _require(
            q.dtype == k.dtype == v.dtype, f"{op}: query, key, value dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
        )
        b, nq, nkv, sq, skv, d, dv = self._fusion_shapes(op, q, k, v, layout, a.head_num)
        keep = self._fusion_mask(op, a, b, nq, sq, skv)

        self.calls.append(
            (
                op,
                dict(
                    shape=tuple(q.shape),
                    dtype=q.dtype,
                    head_num=a.head_num,
                    input_layout=a.input_layout,
                    scale=float(a.scale),
                    head_dim=d,
                    atten_mask=a.atten_mask is not None,
                    pre_tockens=a.pre_tockens,
                    next_tockens=a.next_tockens,
                    keep_prob=a.keep_prob,
                    sparse_mode=a.sparse_mode,
                    kv_heads=nkv,
                ),
            )
        )
        q4 = _to_bnsd(q.cpu(), layout, nq)
        k4, v4 = _to_bnsd(k.cpu(), layout, nkv), _to_bnsd(v.cpu(), layout, nkv)
        out, row_max, row_sum = _attend(q4, k4, v4, float(a.scale), keep)
        # Outputs (docs 输出说明; shapes from op_plugin): attention_out in the input layout and dtype (D of value);
        # softmax_max and softmax_sum, fp32 (B, N, Sq, 8), each row's value repeated 8 times; softmax_out, reserved
        # (empty, query dtype); the dropout seed and offset (0 without dropout) and the dropout mask length B*N*Sq*Skv.
        attention_out = _from_bnsd(out.to(q.dtype), layout).to(device)
        softmax_max = row_max.expand(b, nq, sq, 8).contiguous().to(device)
        softmax_sum = row_sum.expand(b, nq, sq, 8).contiguous().to(device)
        softmax_out = torch.empty(0, dtype=q.dtype, device=device)
        return attention_out, softmax_max, softmax_sum, softmax_out, 0, 0, b * nq * sq * skv

    @staticmethod
    def _fusion_shapes(op: str, q, k, v, layout: str, head_num: int) -> tuple[int, ...]:
        """-> B, Nq, Nkv, Sq, Skv, D (query and key), Dv, after the documented shape rules."""
        if layout in ("BSH", "SBH"):
            _require(q.dim() == k.dim() == v.dim() == 3, f"{op}: {layout} takes 3-D query, key and value")
            b_axis, s_axis = (0, 1) if layout == "BSH" else (1, 0)
            _require(
                head_num > 0 and q.shape[2] % head_num == 0, f"{op}: hidden size {q.shape[2]} vs head_num {head_num}"
            )
            nq, d = head_num, q.shape[2] // head_num
            _require(d > 0 and k.shape[2] % d == 0, f"{op}: key hidden size {k.shape[2]} is not a multiple of D={d}")
            nkv = k.shape[2] // d
            _require(nkv > 0 and v.shape[2] % nkv == 0, f"{op}: value hidden size {v.shape[2]} vs {nkv} key heads")
            dv = v.shape[2] // nkv
        else:
            _require(q.dim() == k.dim() == v.dim() == 4, f"{op}: {layout} takes 4-D query, key and value")
            n_axis = 1 if layout == "BNSD" else 2
            s_axis, b_axis = 3 - n_axis, 0
            nq, nkv, d, dv = q.shape[n_axis], k.shape[n_axis], q.shape[3], v.shape[3]
            _require(nq == head_num, f"{op}: head_num {head_num} but the {layout} query has N={nq}")
            _require(k.shape[3] == d, f"{op}: head dims differ: query {d}, key {k.shape[3]} (Dq=Dk)")
            _require(v.shape[n_axis] == nkv, f"{op}: key has {nkv} heads, value {v.shape[n_axis]}")
        b, sq, skv = q.shape[b_axis], q.shape[s_axis], k.shape[s_axis]
        _require(k.shape[b_axis] == v.shape[b_axis] == b, f"{op}: batch sizes differ")
        _require(v.shape[s_axis] == skv, f"{op}: key and value sequence lengths differ")
        # 约束说明: N of key/value divides Nq (GQA), Nq 1..256; Dq=Dk>=Dv, D 1..768 (no alignment: unaligned is padded)
        _require(1 <= nq <= 256, f"{op}: {nq} query heads (1..256)")
        _require(nq % nkv == 0, f"{op}: GQA needs Nq % Nkv == 0, got Nq={nq}, Nkv={nkv}")
        _require(1 <= d <= 768, f"{op}: head_dim {d} (1..768)")
        _require(dv <= d, f"{op}: value head dim Dv={dv} exceeds Dk={d} (Dk>=Dv)")
        return b, nq, nkv, sq, skv, d, dv

    @staticmethod
    def _fusion_mask(op: str, a, b: int, n: int, sq: int, skv: int):
        """NPU mask (True/1 = masked out) -> keep-mask (True = attend), by sparse_mode (docs, 表1 sparse_mode)."""
        mask = a.atten_mask
        if mask is None:  # "当atten_mask输入为None时, sparse_mode, pre_tockens, next_tockens参数不生效, 固定为全计算"
            return None
        _require(mask.dtype in (torch.bool, torch.uint8), f"{op}: atten_mask dtype {mask.dtype} (bool or uint8)")
        mode = a.sparse_mode
        _not_modelled(mode in (5, 6), "sparse_mode 5/6 (prefix)")
        if mode in (0, 1):  # defaultMask / allMask: the full mask, BNSS, B1SS, 11SS or SS
            shapes = ((b, n, sq, skv), (b, 1, sq, skv), (1, 1, sq, skv), (sq, skv))
            _require(
                tuple(mask.shape) in shapes, f"{op}: atten_mask shape {tuple(mask.shape)} (BNSS, B1SS, 11SS or SS)"
            )
            keep = mask.cpu() == 0
            # mode 0: the tokens between pre_tockens and next_tockens, from the top-left; mode 1 ignores them
            return keep & _band(sq, skv, a.pre_tockens, a.next_tockens, 0) if mode == 0 else keep
        _compressed(op, mask, ((COMPRESSED, COMPRESSED), (1, 1, COMPRESSED, COMPRESSED)))
        corner = skv - sq  # 2: leftUpCausal; 3: rightDownCausal; 4: band, origin at the bottom-right
        return {
            2: _band(sq, skv, MAX_TOKENS, 0, 0),
            3: _band(sq, skv, MAX_TOKENS, 0, corner),
            4: _band(sq, skv, a.pre_tockens, a.next_tockens, corner),
        }[mode]

    # -------------------------------------------------------------------------- npu_fused_infer_attention_score

    def _fused_infer_attention_score(self, a) -> tuple:
        op = "npu_fused_infer_attention_score"
        q, k, v = a.query, a.key, a.value
        names = ("query", "key", "value", "pse_shift", "atten_mask", "dequant_scale1", "quant_scale1")
        names += ("dequant_scale2", "quant_scale2", "quant_offset2", "antiquant_scale", "antiquant_offset")
        names += ("key_antiquant_scale", "key_antiquant_offset", "value_antiquant_scale", "value_antiquant_offset")
        names += ("block_table", "query_padding_size", "kv_padding_size", "key_shared_prefix", "value_shared_prefix")
        names += ("query_rope", "key_rope", "key_rope_antiquant_scale")
        tensors = {name: getattr(a, name) for name in names}
        self._dispatch(op, tensors)
        device = self._placed(op, tensors)
        for name in names[3:]:
            _not_modelled(name != "atten_mask" and tensors[name] is not None, f"{op}({name}=...)")
        for name in ("actual_seq_lengths", "actual_seq_lengths_kv", "actual_shared_prefix_len"):
            _not_modelled(getattr(a, name) is not None, f"{op}({name}=...)")
        _not_modelled(
            (a.block_size, a.antiquant_mode, a.key_antiquant_mode, a.value_antiquant_mode) != (0, 0, 0, 0),
            "paged/quantized KV",
        )

        # FusedInferAttentionScoreKernelNpuOpApi.cpp hands input_layout on unchanged: no upper-casing here.
        layout = a.input_layout
        _not_modelled(layout in ("TND", "TND_NTD", "NTD_TND", "NTD"), f"the {layout} (variable-length) layout")
        _require(
            layout in self.FUSED_INFER_LAYOUTS, f"{op}: input_layout {layout!r} (docs: BSH, BSND, BNSD, BNSD_BSND, TND)"
        )
        # Docs (参数说明): query fp16/bf16/int8, "不支持非连续的Tensor" for query, key, value, atten_mask.
        _not_modelled(q.dtype == torch.int8, "int8 (quantized) attention")
        _require(q.dtype in (torch.float16, torch.bfloat16), f"{op}: query dtype {q.dtype} (float16 or bfloat16)")
        _require(
            q.dtype == k.dtype == v.dtype, f"{op}: query, key, value dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
        )
        for name in ("query", "key", "value", "atten_mask"):
            _require(tensors[name] is None or tensors[name].is_contiguous(), f"{op}: {name} is not contiguous")
        _require(
            k.shape == v.shape, f"{op}: key {tuple(k.shape)} and value {tuple(v.shape)} differ (约束说明: 完全一致)"
        )
        b, n, nkv, sq, skv, d = self._fused_infer_shapes(op, q, k, layout, a.num_heads, a.num_key_value_heads)
        keep = self._fused_infer_mask(op, a, b, sq, skv)

        self.calls.append(
            (
                op,
                dict(
                    shape=tuple(q.shape),
                    dtype=q.dtype,
                    num_heads=a.num_heads,
                    num_key_value_heads=a.num_key_value_heads,
                    input_layout=layout,
                    scale=float(a.scale),
                    head_dim=d,
                    atten_mask=a.atten_mask is not None,
                    sparse_mode=a.sparse_mode,
                ),
            )
        )
        q4 = _to_bnsd(q.cpu(), layout, n)
        k4, v4 = _to_bnsd(k.cpu(), layout, nkv), _to_bnsd(v.cpu(), layout, nkv)
        out, row_max, row_sum = _attend(q4, k4, v4, float(a.scale), keep)
        # Outputs (docs 输出说明): attention_out in the query's layout (BSND for BNSD_BSND) and dtype; softmax_lse fp32
        # (B, N, Sq, 1) with softmax_lse_flag, else a 1-element 0 tensor.
        attention_out = _from_bnsd(out.to(q.dtype), layout).to(device)
        lse = (row_max + row_sum.log()) if a.softmax_lse_flag else torch.zeros(1)
        return attention_out, lse.to(device)

    @staticmethod
    def _fused_infer_shapes(op: str, q, k, layout: str, num_heads: int, num_kv_heads: int) -> tuple[int, ...]:
        """-> B, N, Nkv, Sq, Skv, D, after the documented rules (参数说明 num_heads / num_key_value_heads, 约束说明)."""
        _require(num_heads > 0, f"numHeads should be greater than 0, but got {num_heads}")  # meta registration
        nkv = num_kv_heads or num_heads  # 0: as many as the query
        _require(
            num_heads % nkv == 0 and num_heads // nkv <= 64, f"{op}: num_heads {num_heads} vs num_key_value_heads {nkv}"
        )
        if layout == "BSH":
            _require(q.dim() == k.dim() == 3, f"{op}: BSH takes 3-D query, key and value")
            _require(q.shape[2] % num_heads == 0, f"{op}: hidden size {q.shape[2]} vs num_heads {num_heads}")
            b, sq, d = q.shape[0], q.shape[1], q.shape[2] // num_heads
            skv = k.shape[1]
            _require(k.shape[2] == nkv * d, f"{op}: key hidden size {k.shape[2]} != {nkv} heads x D={d}")
            _require(k.shape[0] == b, f"{op}: batch sizes differ")
        else:
            _require(q.dim() == k.dim() == 4, f"{op}: {layout} takes 4-D query, key and value")
            n_axis = 2 if layout == "BSND" else 1
            s_axis = 3 - n_axis
            b, sq, d, skv = q.shape[0], q.shape[s_axis], q.shape[3], k.shape[s_axis]
            _require(q.shape[n_axis] == num_heads, f"{op}: num_heads {num_heads} but the query has N={q.shape[n_axis]}")
            _require(k.shape[n_axis] == nkv, f"{op}: key has {k.shape[n_axis]} heads, num_key_value_heads says {nkv}")
            _require(k.shape[3] == d, f"{op}: head dims differ: query {d}, key {k.shape[3]}")
            _require(k.shape[0] == b, f"{op}: batch sizes differ")
        _require(layout != "BNSD_BSND" or sq > 1, f"{op}: BNSD_BSND needs Q_S > 1")
        # 约束说明 (Q_S > 1 and Q_S = 1 alike): N <= 256, D <= 512; BSH/BSND: N*D < 65535.
        _require(num_heads <= 256, f"{op}: {num_heads} heads (<= 256)")
        _require(1 <= d <= 512, f"{op}: head_dim {d} (<= 512)")
        _require(layout not in ("BSH", "BSND") or num_heads * d < 65535, f"{op}: N*D={num_heads * d} (< 65535)")
        if sq > 1 and d % 16:
            # "D轴32byte不对齐时仅支持到128" vs "输入类型全为float16、bfloat16时, D轴需16对齐": both reject an unaligned
            # D above 128; below, the docs contradict each other, so the stand-in won't guess.
            _require(d <= 128, f"{op}: head_dim {d} is not 16-aligned and > 128")
            _not_modelled(True, f"an unaligned head_dim {d} <= 128 (the docs disagree)")
        return b, num_heads, nkv, sq, skv, d

    @staticmethod
    def _fused_infer_mask(op: str, a, b: int, sq: int, skv: int):
        """NPU mask (True/1 = masked out) -> keep-mask (True = attend), by sparse_mode (参数说明 atten_mask).

        Documented forms for modes 0/1: (Q_S, KV_S) (Q_S > 1; (B, KV_S) when Q_S = 1), (1, Q_S, KV_S),
        (B, 1, Q_S, KV_S), (1, 1, Q_S, KV_S); (B, Q_S, KV_S) from the PromptFlashAttention branch it takes for Q_S > 1.
        No per-head form."""
        mask, mode = a.atten_mask, a.sparse_mode
        if mask is not None:
            _require(mask.dtype in (torch.bool, torch.int8, torch.uint8), f"{op}: atten_mask dtype {mask.dtype}")
        if sq == 1:  # IncreFlashAttention branch: sparse_mode, pre_tokens and next_tokens have no effect
            mode = 0
        _require(mode in (0, 1, 2, 3, 4), f"{op}: sparse_mode {a.sparse_mode} (0, 1, 2, 3 or 4)")
        if mode in (2, 3, 4):
            _require(mask is not None, f"{op}: sparse_mode {mode} needs the compressed atten_mask")
            _compressed(op, mask, ((COMPRESSED,) * 2, (1, COMPRESSED, COMPRESSED), (1, 1, COMPRESSED, COMPRESSED)))
            corner = skv - sq
            pre, nxt = {2: (MAX_TOKENS, 0), 3: (MAX_TOKENS, 0), 4: (a.pre_tokens, a.next_tokens)}[mode]
            return _band(sq, skv, pre, nxt, 0 if mode == 2 else corner)
        if mask is None:
            _require(mode == 0, f"{op}: sparse_mode 1 (allMask) needs the full atten_mask")
            return None  # mode 0 without a mask: pre_tokens and next_tokens are ignored (内部赋值为INT_MAX)
        shape = tuple(mask.shape)
        two_d = (sq, skv) if sq > 1 else (b, skv)
        shapes = (two_d, (1, sq, skv), (b, sq, skv), (1, 1, sq, skv), (b, 1, sq, skv))
        _require(shape in shapes, f"{op}: atten_mask shape {shape} (one of {sorted(set(shapes))}; no per-head form)")
        keep = mask.cpu() == 0
        keep = keep[:, None, None, :] if sq == 1 and shape == (b, skv) else keep
        keep = keep[:, None] if keep.dim() == 3 else keep  # (B|1, Sq, Skv) -> (B|1, 1, Sq, Skv)
        if mode == 0 and sq > 1:  # the tokens between pre_tokens and next_tokens, as npu_fusion_attention
            keep = keep & _band(sq, skv, a.pre_tokens, a.next_tokens, 0)
        return keep


def ensure_npu_device_type() -> None:
    """Let `torch.device("npu")` parse, by naming torch's PrivateUse1 backend "npu" (what torch_npu does).

    Process-wide and irreversible, so done once; it only names the device type (no ops are registered,
    so an accidental move of a tensor to it fails loudly).
    """
    name = torch._C._get_privateuse1_backend_name()
    if name == "npu":
        return
    if name != "privateuseone":
        pytest.skip(f"PrivateUse1 is already named {name!r}; cannot stand in for torch_npu")
    torch.utils.rename_privateuse1_backend("npu")


def _vendor_npu_checks() -> list:
    """transformers' and accelerate's per-process (lru_cache) "is there an NPU?" checks."""
    from accelerate.utils import imports as accelerate_imports
    from transformers.utils import import_utils as transformers_imports

    return [accelerate_imports.is_npu_available, transformers_imports.is_torch_npu_available]


def _settle_vendor_checks() -> None:
    # Evaluated while no torch_npu exists, so they answer "no" (as on this machine) and keep that
    # answer while the stand-in is installed, instead of switching the libraries onto NPU code paths.
    for check in _vendor_npu_checks():
        check.cache_clear()
        for args, kwargs in (
            ((), {}),
            ((False,), {}),
            ((True,), {}),
            ((), {"check_device": False}),
            ((), {"check_device": True}),
        ):
            check(*args, **kwargs)


def install(monkeypatch: pytest.MonkeyPatch, available: bool = True, device_count: int = 1) -> StandIn:
    """Install the stand-in as `torch_npu` and `torch.npu` until `monkeypatch` is undone.

    Call `uninstall()` at teardown (the `npu_standin` fixture does), so no library caches an answer
    computed while the stand-in was there.
    """
    ensure_npu_device_type()
    _settle_vendor_checks()
    standin = StandIn(available, device_count)
    monkeypatch.setitem(sys.modules, "torch_npu", standin.module)
    # torch._register_device_module("npu", torch_npu.npu), as torch_npu does: the attribute and sys.modules, where
    # torch's lazy device init imports it from (the first tensor made on "npu" calls torch.npu._lazy_init()).
    monkeypatch.setattr(torch, "npu", standin.npu, raising=False)
    monkeypatch.setitem(sys.modules, "torch.npu", standin.npu)
    torch.get_device_module.cache_clear()  # cached per device type: diffusers reaches torch.npu through it
    return standin


def uninstall() -> None:
    """Forget vendor answers cached while the stand-in was installed."""
    for check in _vendor_npu_checks():
        check.cache_clear()
    torch.get_device_module.cache_clear()


@pytest.fixture
def npu_standin(monkeypatch: pytest.MonkeyPatch):
    """The stand-in `torch_npu` (one visible device) for one test."""
    standin = install(monkeypatch)
    yield standin
    uninstall()
