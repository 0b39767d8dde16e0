"""A virtual accelerator for CPU-only tests: a device that is not the CPU, computed on the CPU.

`with VirtualDevice() as vd:` (also a pytest fixture body) installs it; leaving restores all global state.
`VirtualDevice(device_type="npu", register_module=False, pinned_memory=True)` presents torch's PrivateUse1 device
instead, under the name the torch_npu stand-in (tests/npu_standin.py) gives it, with that stand-in's `torch.npu`.

- Device tensors report `torch.device("lazy", 0)` and keep their data in a plain CPU tensor (`_elem`). Ops
  make `VirtualTensor`s (`_make_wrapper_subclass`); a tensor that already exists as a Python object (a
  Parameter, a buffer, bnb's Int8Params) keeps its class and identity when it moves by `.data =`: only its
  TensorImpl is swapped for a wrapper's, as CUDA's `set_data` keeps the object. Every aten op runs the same
  CPU kernel on the unwrapped data, so results equal a CPU run on the same memory.
- A `TorchDispatchMode` sees every aten op (custom ones such as bitsandbytes' included). It turns `.to()`,
  `copy_` and factories with `device=<virtual>` into device tensors, records each host<->device copy (shape,
  bytes, origin), counts live device storages once each (memory and peak), and raises CUDA's error when an
  op mixes devices. As on CUDA, 0-dim CPU tensors pass as scalars into pointwise ops, CPU index tensors are
  accepted by indexing (and counted as copies), and a CPU generator cannot feed a device random op.
- A `TorchFunctionMode` handles what never reaches aten: `.data =` across devices,
  `torch._has_compatible_shallow_copy_type` (answered as for CUDA<->CPU, so `nn.Module._apply` keeps
  parameter identity), `data_ptr`, `tolist`/`numpy`/`__format__`/deepcopy/pickling, and scaled-dot-product
  attention, a composite whose decomposition depends on the device type, run whole on the CPU data so it
  picks the CPU kernel exactly as a CPU run does.
- `torch.Tensor._make_subclass` (which torch functions never see) is shadowed while installed, so a device
  tensor can be re-classed as on CUDA: bitsandbytes moves a quantized weight as `Int8Params(t.to(device))`. The
  shadow has the signature torch._dynamo's polyfill checks, so installing before diffusers is imported works.
- `torch.lazy` is a device module (`torch._register_device_module`) with the torch.cuda calls diffusers,
  accelerate and the runtime make; its memory figures come from the live device storages.

Why this approach: wrapper tensors plus modes need no C++ and are fully undone on exit, whereas a
PrivateUse1 backend is a once-per-process rename that the NPU stand-in in this test session already uses.
Why "lazy" by default: of a CPU build's device types only lazy and meta have a device guard (without one autograd
aborts the process), meta means "no data" to accelerate and diffusers, and none of the libraries we use
special-cases lazy; `torch.lazy` is free to register.
Why PrivateUse1 works too: torch lets Python register PrivateUse1's device guard
(`torch._C._acc.register_python_privateuseone_device_guard`, what torch.utils.backend_registration's
`_setup_privateuseone_for_python_backend` does); installing such a device registers one, once per process (it
cannot be removed, and changes nothing else: PrivateUse1 still has no kernels, so outside the modes "npu" tensors
still cannot be made). Backward on such tensors would also need PrivateUse1 hooks: not registered (inference only).
With `pinned_memory=True`, `Tensor.pin_memory()` gives a CPU copy that `is_pinned()` reports as pinned, as torch_npu
does (a CPU build refuses to pin): group offloading with streams then runs.

Leaving also drops device tensors that libraries cache process-wide (bitsandbytes' quantization code table).

Limits: one device, index 0. Modes are per thread: ops in other threads are not seen (after exit, device
tensors raise). Pinned memory (group offloading with use_stream=True) is refused by a CPU build unless
`pinned_memory=True`. `record_stream` is a no-op (work is synchronous). Random
ops without a generator draw from the device's own generator (`torch.lazy.manual_seed`) where the op has
a generator overload, else from the CPU's. No caching allocator: reserved == allocated. Storages resized
in place are not re-measured. Device tensors cannot be pickled (torch.save).
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import types
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

DEVICE_TYPE = "lazy"
DEVICE = torch.device(DEVICE_TYPE, 0)
CPU = torch.device("cpu")
DEFAULT_CAPACITY = 80 * 2**30  # bytes, reported by mem_get_info; allocations beyond it raise OutOfMemoryError

_ACTIVE: VirtualDevice | None = None  # the installed device (at most one)
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_THIS_FILE = os.path.abspath(__file__)
_ROOT = os.path.dirname(os.path.dirname(_THIS_FILE)) + os.sep
_aten = torch.ops.aten
_SDPA = torch.nn.functional.scaled_dot_product_attention
_HAS_COMPAT = torch._has_compatible_shallow_copy_type
_MAKE_SUBCLASS = torch.Tensor._make_subclass  # TensorBase's; torch functions never see it
_DATA = torch._C.TensorBase.data
_DATA_PTR = torch.Tensor.data_ptr
_TOLIST, _FORMAT = torch.Tensor.tolist, torch.Tensor.__format__
_NUMPY = (torch.Tensor.numpy, torch.Tensor.__array__)
_DEEPCOPY, _REDUCE = torch.Tensor.__deepcopy__, torch.Tensor.__reduce_ex__
_PIN_MEMORY, _IS_PINNED = torch.Tensor.pin_memory, torch.Tensor.is_pinned
# Ops that CUDA lets take a 0-dim CPU tensor as a scalar although they are not tagged pointwise.
_SCALAR_OK = {_aten.fill_.Tensor, _aten.fill.Tensor, _aten.masked_fill_.Tensor, _aten.masked_fill.Tensor}
# Advanced indexing accepts CPU index tensors on CUDA (copying them to the device first).
_INDEX_OPS = {
    _aten.index.Tensor,
    _aten._unsafe_index.Tensor,
    _aten.index_put_.default,
    _aten.index_put.default,
    _aten._index_put_impl_.default,
    _aten._unsafe_index_put.default,
}


_PLAIN = (torch.Tensor, torch.nn.Parameter)
_OWNS_DISPATCH: dict[type, bool] = {}


def _owns_dispatch(cls: type) -> bool:
    """True for subclasses with their own __torch_dispatch__ (bnb's Int8Params has none: a plain tensor here)."""
    owns = _OWNS_DISPATCH.get(cls)
    if owns is None:
        impl = getattr(cls.__torch_dispatch__, "__func__", cls.__torch_dispatch__)
        owns = _OWNS_DISPATCH[cls] = impl is not torch._C._disabled_torch_dispatch_impl
    return owns


def _virtual_args(args: tuple, kwargs: dict) -> bool | None:
    """Whether an op's arguments include a tensor of the virtual device; None when another wrapper subclass
    (torchao) runs the op, calling back with its parts."""
    has_virtual = False
    for a in (*args, *kwargs.values()):
        for b in a if type(a) in (list, tuple) else (a,):
            t = type(b)
            if t is VirtualTensor:
                has_virtual = True
            elif isinstance(b, torch.Tensor):
                if "_vowner" in b.__dict__:
                    has_virtual = True  # a Parameter / buffer moved here by `.data =`
                elif t not in _PLAIN and _owns_dispatch(t):
                    return None
    return has_virtual


def _same_device_error(a: torch.device, b: torch.device) -> RuntimeError:
    return RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, {a} and {b}!")


# ------------------------------------------------------------------------------------------ copy records


@dataclass(frozen=True)
class CopyRecord:
    """One host->device ("h2d") or device->host ("d2h") transfer."""

    direction: str
    op: str  # aten op that moved the data, e.g. "aten._to_copy.default"
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    stack: tuple[str, ...]  # innermost first, frames outside torch and this module: "path:line in func"

    @property
    def origin(self) -> str:
        return self.stack[0] if self.stack else "?"

    def __str__(self) -> str:
        return f"{self.direction} {list(self.shape)} {self.dtype} {self.nbytes} B via {self.op} at {self.origin}"


@dataclass
class CopyLog:
    """Copies recorded in a region (`VirtualDevice.copies()`) or since the last reset (`VirtualDevice.log`)."""

    records: list[CopyRecord] = field(default_factory=list)

    def of(self, direction: str) -> list[CopyRecord]:
        return [r for r in self.records if r.direction == direction]

    @property
    def h2d_count(self) -> int:
        return len(self.of("h2d"))

    @property
    def h2d_bytes(self) -> int:
        return sum(r.nbytes for r in self.of("h2d"))

    @property
    def d2h_count(self) -> int:
        return len(self.of("d2h"))

    @property
    def d2h_bytes(self) -> int:
        return sum(r.nbytes for r in self.of("d2h"))

    def clear(self) -> None:
        self.records.clear()

    def summary(self, limit: int = 40) -> str:
        """One line per copy, for assertion messages."""
        lines = [str(r) for r in self.records[:limit]]
        if len(self.records) > limit:
            lines.append(f"... and {len(self.records) - limit} more")
        return "\n".join(lines) or "(no copies)"


def _clear_device_module_cache() -> None:
    # torch.get_device_module is an lru_cache: it would keep handing out a previous install's module.
    clear = getattr(torch.get_device_module, "cache_clear", None)
    if clear is not None:
        clear()


class _PythonDeviceGuard(torch._C._acc.DeviceGuard):
    """PrivateUse1's device guard, in Python (torch.utils.backend_registration's dummy guard): one device, 0."""

    def type_(self) -> Any:
        return torch._C._autograd.DeviceType.PrivateUse1


_GUARD: _PythonDeviceGuard | None = None


def _register_device_guard() -> None:
    """Give PrivateUse1 a device guard, once per process (torch offers no way to remove one).

    Without a guard, autograd aborts the process on the first PrivateUse1 tensor that requires grad (a Parameter
    in an op under grad mode); with it, nothing else changes: PrivateUse1 still has no kernels and no allocator,
    so outside the virtual device's modes `torch.zeros(1, device="npu")` still fails."""
    global _GUARD
    if _GUARD is None:
        guard = _PythonDeviceGuard()
        torch._C._acc.register_python_privateuseone_device_guard(guard)
        _GUARD = guard  # kept alive: torch holds it by reference


def _short(path: str) -> str:
    if "site-packages" + os.sep in path:
        return path.split("site-packages" + os.sep, 1)[1]
    return path[len(_ROOT) :] if path.startswith(_ROOT) else path


def _stack(limit: int = 6) -> tuple[str, ...]:
    # Walk frames directly (traceback.extract_stack reads source lines: too slow per copy).
    out: list[str] = []
    f = sys._getframe(2)
    while f is not None and len(out) < limit:
        name = f.f_code.co_filename
        if not (name.startswith(_TORCH_DIR) or name == _THIS_FILE or name.endswith("contextlib.py")):
            out.append(f"{_short(name)}:{f.f_lineno} in {f.f_code.co_name}")
        f = f.f_back
    return tuple(out)


# ------------------------------------------------------------------------------------------ the tensor


class VirtualTensor(torch.Tensor):
    """A tensor on the virtual device made by an op; its data is `_elem`, a CPU tensor of the same layout.

    A tensor that was already a Python object (a Parameter, a buffer, bnb's Int8Params) keeps its class
    when it moves here by `.data =`: it gets a VirtualTensor's TensorImpl and the same `_elem`/`_vkey`/
    `_vowner` entries in its `__dict__`. `is_virtual` recognises both.

    Calling the class builds an `nn.Parameter`, because libraries rebuild parameters as
    `type(param)(data, requires_grad=...)` (accelerate's set_module_tensor_to_device) and must get what
    they would for a CUDA parameter.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __new__(cls, data: torch.Tensor | None = None, requires_grad: bool = True) -> torch.Tensor:
        return torch.nn.Parameter(data, requires_grad=requires_grad)

    def __del__(self) -> None:
        owner = self.__dict__.get("_vowner")
        if owner is not None:
            owner._release(self.__dict__["_vkey"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached only when the mode is not on this thread's stack.
        if _ACTIVE is None:
            raise RuntimeError(f"{func}: a virtual-device tensor was used after VirtualDevice exited")
        return _ACTIVE._dispatch(func, types, args, kwargs or {})


_STATE = ("_elem", "_vkey", "_vowner", "_vfinal")


def is_virtual(t: Any) -> bool:
    """True for a tensor on the virtual device (a VirtualTensor, or a tensor moved there by `.data =`)."""
    return type(t) is VirtualTensor or (isinstance(t, torch.Tensor) and "_vowner" in t.__dict__)


def _elem(t: torch.Tensor) -> torch.Tensor:
    return t.__dict__["_elem"]


def _make_subclass(cls: type, data: torch.Tensor, requires_grad: bool = False, **kwargs: Any) -> torch.Tensor:
    """`torch.Tensor._make_subclass` while installed. A device tensor is already a Python object (a
    VirtualTensor), which TensorBase's refuses to re-class; bitsandbytes' `Int8Params(t.to(device))` and
    `Params4bit(...)` do exactly that. As on CUDA, the result is a `cls` sharing data's storage: a CPU
    placeholder of `cls` given data's device storage by `.data =`."""
    if _ACTIVE is None or not is_virtual(data) or issubclass(cls, VirtualTensor):
        return _MAKE_SUBCLASS(cls, data, requires_grad, **kwargs)
    obj = _MAKE_SUBCLASS(cls, torch.empty(0, dtype=data.dtype, device=CPU), requires_grad, **kwargs)
    _ACTIVE._set_data(obj, data)
    return obj


# ------------------------------------------------------------------------------------------ torch.lazy


class Stream:
    """Stand-in for torch.cuda.Stream: work is synchronous, so every wait is already satisfied."""

    default_device = DEVICE  # the installed device's (DeviceModule makes a subclass per device)

    def __init__(self, device: Any = None, priority: int = 0, **_: Any):
        self.device = self.default_device
        self.priority = priority

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def wait_stream(self, stream: Stream) -> None:
        pass

    def wait_event(self, event: Event) -> None:
        pass

    def record_event(self, event: Event | None = None) -> Event:
        return event or Event()


class Event:
    def __init__(self, enable_timing: bool = False, **_: Any):
        self.enable_timing = enable_timing

    def record(self, stream: Stream | None = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait(self, stream: Stream | None = None) -> None:
        pass

    def query(self) -> bool:
        return True


class DeviceModule(types.ModuleType):
    """`torch.lazy` while a VirtualDevice is installed: the torch.cuda calls diffusers/accelerate/backends make."""

    Stream = Stream
    Event = Event

    def __init__(self, vd: VirtualDevice):
        super().__init__(f"torch.{vd.device.type}")
        self._vd = vd
        self.Stream = type("Stream", (Stream,), {"default_device": vd.device})
        self._default_stream = self.Stream()
        self._current_stream = self._default_stream
        self.calls: list[str] = []  # names of the calls that change state (set_device, empty_cache, ...)

    def _check(self, device: Any) -> None:
        if device is None:
            return
        ours = self._vd.device
        d = torch.device(ours.type, device) if isinstance(device, int) else torch.device(device)
        if d != ours and not (d.type == ours.type and d.index is None):
            raise RuntimeError(f"invalid device {device!r}: the virtual device is {ours}")

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def init(self) -> None:
        pass

    def _is_in_bad_fork(self) -> bool:
        return False

    def device_count(self) -> int:
        return 1

    def current_device(self) -> int:
        return 0

    def set_device(self, device: Any) -> None:
        self._check(device)
        self.calls.append("set_device")

    def get_device_name(self, device: Any = None) -> str:
        self._check(device)
        return "Virtual accelerator (CPU-backed)"

    def get_device_properties(self, device: Any = None) -> types.SimpleNamespace:
        self._check(device)
        return types.SimpleNamespace(name=self.get_device_name(), total_memory=self._vd.capacity)

    def synchronize(self, device: Any = None) -> None:
        self._check(device)
        self.calls.append("synchronize")

    def empty_cache(self) -> None:
        self.calls.append("empty_cache")

    def memory_allocated(self, device: Any = None) -> int:
        self._check(device)
        return self._vd.allocated

    def max_memory_allocated(self, device: Any = None) -> int:
        self._check(device)
        return self._vd.peak

    def memory_reserved(self, device: Any = None) -> int:
        self._check(device)
        return self._vd.allocated

    def max_memory_reserved(self, device: Any = None) -> int:
        self._check(device)
        return self._vd.peak

    def reset_peak_memory_stats(self, device: Any = None) -> None:
        self._check(device)
        self._vd.peak = self._vd.allocated

    reset_max_memory_allocated = reset_peak_memory_stats

    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        self._check(device)
        return self._vd.capacity - self._vd.allocated, self._vd.capacity

    def memory_stats(self, device: Any = None) -> dict[str, int]:
        self._check(device)
        return {"allocated_bytes.all.current": self._vd.allocated, "allocated_bytes.all.peak": self._vd.peak}

    # RNG: the device's own generator (CUDA's is separate from the CPU's too).
    def manual_seed(self, seed: int) -> None:
        self._vd.generator.manual_seed(seed)

    manual_seed_all = manual_seed

    def seed(self) -> None:
        self._vd.generator.seed()

    seed_all = seed

    def initial_seed(self) -> int:
        return self._vd.generator.initial_seed()

    def get_rng_state(self, device: Any = None) -> torch.Tensor:
        return self._vd.generator.get_state()

    def set_rng_state(self, state: torch.Tensor, device: Any = None) -> None:
        self._vd.generator.set_state(state)

    # Streams
    def current_stream(self, device: Any = None) -> Stream:
        return self._current_stream

    def default_stream(self, device: Any = None) -> Stream:
        return self._default_stream

    @contextlib.contextmanager
    def stream(self, stream: Stream | None) -> Iterator[None]:
        previous = self._current_stream
        self._current_stream = stream or previous
        try:
            yield
        finally:
            self._current_stream = previous


# ------------------------------------------------------------------------------------------ the modes


class _DispatchMode(TorchDispatchMode):
    def __init__(self, vd: VirtualDevice):
        super().__init__()
        self.vd = vd

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.vd._dispatch(func, types, args, kwargs or {})


def _forget_library_caches() -> None:
    """Drop device tensors that libraries cache process-wide (they remake them on next use): after exit they
    would be dead. bitsandbytes keeps its blockwise-quantization code table on the device of first use."""
    bnb_functional = sys.modules.get("bitsandbytes.functional")
    qmaps = getattr(bnb_functional, "name2qmap", {})
    for name in [n for n, t in qmaps.items() if is_virtual(t)]:
        del qmaps[name]


class _FunctionMode(TorchFunctionMode):
    def __init__(self, vd: VirtualDevice):
        super().__init__()
        self.vd = vd

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _FUNCTION_HANDLERS.get(func)
        if handler is not None:
            return handler(self.vd, func, args, kwargs)
        if func is _HAS_COMPAT:
            a, b = args
            if is_virtual(a) != is_virtual(b):
                other = b if is_virtual(a) else a
                return not _owns_dispatch(type(other)) and other.device.type == "cpu"
        elif func is _DATA_PTR and is_virtual(args[0]):
            return _elem(args[0]).data_ptr()
        elif func is _TOLIST and is_virtual(args[0]):  # torch refuses subclasses; CUDA copies to the host
            self.vd._record("d2h", "Tensor.tolist", args[0])
            return _elem(args[0]).tolist()
        elif func in _NUMPY and is_virtual(args[0]):
            raise TypeError(
                f"can't convert {args[0].device} device type tensor to numpy. "
                "Use Tensor.cpu() to copy the tensor to host memory first."
            )
        elif func is _DEEPCOPY and is_virtual(args[0]):
            return self.vd._deepcopy(*args)
        elif func is _REDUCE and is_virtual(args[0]):
            raise NotImplementedError(
                f"pickling a {args[0].device} tensor (torch.save) is not supported by the virtual device; "
                "move it to the CPU first"
            )
        elif func is _FORMAT and type(args[0]) is VirtualTensor and args[0].dim() == 0:
            return args[0].item().__format__(*args[1:])  # as for a 0-dim torch.Tensor on CUDA
        elif getattr(func, "__self__", None) is _DATA and func.__name__ == "__set__":
            target, value = args
            if is_virtual(target) or is_virtual(value):
                return self.vd._set_data(target, value)
        return func(*args, **kwargs)


@dataclass
class _OpInfo:
    pointwise: bool
    names: tuple[str, ...]  # schema argument names, by position
    writes: frozenset[str]  # arguments the op writes to (in-place / out=)
    has_generator: bool
    generator_overload: Any  # for seeded ops without `generator=`: the overload that has one, else None
    composite: bool  # CompositeImplicitAutograd: seen undecomposed only inside another subclass's dispatch


def _op_info(func) -> _OpInfo:
    schema = func._schema
    names = tuple(a.name for a in schema.arguments)
    writes = frozenset(a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write)
    overload = None
    if "generator" not in names and torch.Tag.nondeterministic_seeded in func.tags:
        base = func._overloadname  # randn.default -> randn.generator, randint.low -> randint.low_generator
        alt = "generator" if base == "default" else f"{base}_generator"
        if alt in func.overloadpacket.overloads():
            overload = getattr(func.overloadpacket, alt)
    composite = torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd")
    return _OpInfo(torch.Tag.pointwise in func.tags, names, writes, "generator" in names, overload, composite)


# ------------------------------------------------------------------------------------------ the device


class VirtualDevice:
    """The virtual accelerator. `with VirtualDevice(capacity=...) as vd:` installs it (one at a time; safe to
    repeat); leaving restores global state.

    - `vd.device`: where tensors go, `torch.device("lazy", 0)`; `vd.module` is `torch.lazy` (the device module,
      registered unless `register_module=False`). `device_type` may be PrivateUse1's current name instead of lazy.
    - `vd.holds(t)`: t is a device tensor, or the CPU data of one inside the op it was handed to.
    - Copies: `vd.log` holds every copy since entry or `vd.reset_copies()`; `with vd.copies() as c:` records
      a region (`c.h2d_count`, `c.h2d_bytes`, `c.d2h_count`, `c.d2h_bytes`, `c.records`, `c.summary()`).
    - Memory: `vd.memory_allocated()`, `vd.max_memory_allocated()`, `vd.reset_peak_memory_stats()` (also as
      `torch.lazy.*`); allocating past `capacity` bytes raises `torch.OutOfMemoryError`.
    """

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        device_type: str = DEVICE_TYPE,
        *,
        register_module: bool = True,
        pinned_memory: bool = False,
    ):
        if device_type not in (DEVICE_TYPE, torch._C._get_privateuse1_backend_name()):
            raise ValueError(
                f"device type {device_type!r}: the virtual device is {DEVICE_TYPE!r} or PrivateUse1 under its "
                f"current name ({torch._C._get_privateuse1_backend_name()!r}; rename it first)"
            )
        self.device = torch.device(device_type, 0)
        self.register_module = register_module  # False: torch.<type> is someone else's (the torch_npu stand-in's)
        self.pinned_memory = pinned_memory  # emulate Tensor.pin_memory (a CPU build refuses it)
        self._pinned: set[int] = set()  # data pointers of the "pinned" CPU storages made by pin_memory
        self.capacity = capacity
        self.allocated = 0  # bytes of storages referenced by live virtual tensors, each counted once
        self.peak = 0
        self.log = CopyLog()
        self.generator = torch.Generator()  # the device's RNG (kept on the CPU, where its ops run)
        self.module = DeviceModule(self)
        self._storages: dict[int, list[int]] = {}  # StorageImpl address -> [live wrappers, nbytes]
        self._regions: list[CopyLog] = []
        self._ops: dict[Any, _OpInfo] = {}
        self._running: list[dict[int, torch.Tensor]] = []  # per op running on CPU data: id(data) -> device tensor
        self._modes: tuple[TorchFunctionMode, TorchDispatchMode] | None = None
        self._saved_lift: bool | None = None

    # ---------------------------------------------------------------- install / uninstall

    def __enter__(self) -> VirtualDevice:
        global _ACTIVE
        if _ACTIVE is not None:
            raise RuntimeError("a VirtualDevice is already installed")
        kind = self.device.type
        if kind != DEVICE_TYPE:
            _register_device_guard()
        if self.register_module:
            if hasattr(torch, kind):
                raise RuntimeError(f"torch.{kind} already exists; cannot register the virtual device module")
            torch._register_device_module(kind, self.module)
        _clear_device_module_cache()
        torch.Tensor._make_subclass = staticmethod(_make_subclass)  # shadows TensorBase's until exit
        # torch.tensor(data, device=...) then builds on the CPU and calls .to(), which the mode sees.
        self._saved_lift = torch._C._only_lift_cpu_tensors()
        torch._C._set_only_lift_cpu_tensors(True)
        self._modes = (_FunctionMode(self), _DispatchMode(self))
        entered: list[Any] = []
        try:
            for mode in self._modes:
                mode.__enter__()
                entered.append(mode)
        except BaseException:
            for mode in reversed(entered):
                mode.__exit__(None, None, None)
            self._restore()
            raise
        self.reset_copies()
        self.peak = self.allocated
        _ACTIVE = self
        return self

    def __exit__(self, *exc: Any) -> None:
        global _ACTIVE
        _forget_library_caches()
        _ACTIVE = None
        assert self._modes is not None
        for mode in reversed(self._modes):
            mode.__exit__(None, None, None)
        self._restore()

    def _restore(self) -> None:
        self._modes = None
        if "_make_subclass" in torch.Tensor.__dict__:
            del torch.Tensor._make_subclass
        torch._C._set_only_lift_cpu_tensors(bool(self._saved_lift))
        if self.register_module:
            delattr(torch, self.device.type)
            sys.modules.pop(f"torch.{self.device.type}", None)
        self._pinned.clear()
        _clear_device_module_cache()

    # ---------------------------------------------------------------- copies and memory

    def reset_copies(self) -> None:
        self.log = CopyLog()

    @contextlib.contextmanager
    def copies(self) -> Iterator[CopyLog]:
        """Record the copies made inside the block (regions may nest)."""
        region = CopyLog()
        self._regions.append(region)
        try:
            yield region
        finally:
            self._regions = [r for r in self._regions if r is not region]  # by identity: equal logs are common

    def _record(self, direction: str, func, t: torch.Tensor) -> None:
        rec = CopyRecord(direction, str(func), tuple(t.shape), t.dtype, t.numel() * t.element_size(), _stack())
        self.log.records.append(rec)
        for region in self._regions:
            region.records.append(rec)

    def memory_allocated(self) -> int:
        return self.allocated

    def max_memory_allocated(self) -> int:
        return self.peak

    def reset_peak_memory_stats(self) -> None:
        self.peak = self.allocated

    def _wrap(self, elem: torch.Tensor) -> VirtualTensor:
        t = torch.Tensor._make_wrapper_subclass(
            VirtualTensor,
            elem.size(),
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            device=self.device,
        )
        t.__dict__.update(_elem=elem, _vkey=self._acquire(elem), _vowner=self)
        return t

    def _acquire(self, elem: torch.Tensor) -> int:
        """Count one more live wrapper of elem's storage; a new storage is allocated device memory."""
        storage = elem.untyped_storage()
        key = storage._cdata  # the StorageImpl's address: stable while any wrapper keeps elem alive
        entry = self._storages.get(key)
        if entry is not None:
            entry[0] += 1
            return key
        nbytes = storage.nbytes()
        if self.allocated + nbytes > self.capacity:
            raise torch.OutOfMemoryError(
                f"{self.device} (virtual) out of memory: tried to allocate {nbytes} bytes with "
                f"{self.allocated} of {self.capacity} bytes allocated"
            )
        self._storages[key] = [1, nbytes]
        self.allocated += nbytes
        self.peak = max(self.peak, self.allocated)
        return key

    def _release(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self._storages[key]
            self.allocated -= entry[1]

    # ---------------------------------------------------------------- aten ops

    def _dispatch(self, func, types, args: tuple, kwargs: dict) -> Any:
        device = kwargs.get("device")
        to_virtual = device is not None and device.type == self.device.type
        has_virtual = _virtual_args(args, kwargs)
        if has_virtual is None:
            return NotImplemented  # another wrapper subclass (torchao) runs it, calling back with parts
        if not has_virtual and not to_virtual:
            return func(*args, **kwargs)
        if to_virtual and (device.index or 0) != 0:
            raise RuntimeError(f"{device}: invalid device ordinal (the virtual device is {self.device})")

        info = self._op_info(func)
        if info.composite:  # e.g. aten.to.dtype_layout from torchao: run its decomposition through the mode
            assert self._modes is not None
            with self._modes[1]:
                return func.decompose(*args, **kwargs)
        special = _SPECIAL_OPS.get(func)
        if special is not None:
            return special(self, func, args, kwargs, to_virtual)

        if has_virtual:  # (with only CPU inputs and device=<virtual>, they are templates: zeros_like, new_ones)
            self._check_devices(func, info, args, kwargs)
        if to_virtual:
            kwargs = {**kwargs, "device": CPU}
        out_virtual = to_virtual or (has_virtual and device is None)
        if out_virtual:
            func, kwargs = self._draw_here(func, info, kwargs)

        elems = {}
        cpu_args = tuple(self._unwrap(a, elems) for a in args)
        cpu_kwargs = {k: self._unwrap(v, elems) for k, v in kwargs.items()}
        self._running.append(elems)
        try:
            out = func(*cpu_args, **cpu_kwargs)
        finally:
            self._running.pop()
        if not out_virtual:
            return out  # e.g. new_zeros(device="cpu") or .to("meta") from a virtual tensor
        return self._rewrap(out, elems)

    def holds(self, t: torch.Tensor) -> bool:
        """True for a device tensor, and for the CPU data of one inside the op it was handed to: a kernel that checks
        its arguments' device (the torch_npu stand-in's ops: `StandIn.is_on_device`) sees that data."""
        if is_virtual(t):
            return True
        return any((owner := elems.get(id(t))) is not None and _elem(owner) is t for elems in self._running)

    def _op_info(self, func: Any) -> _OpInfo:
        """What the device needs to know about an aten op (worked out once per op)."""
        info = self._ops.get(func)
        if info is None:
            info = self._ops[func] = _op_info(func)
        return info

    def _draw_here(self, func: Any, info: _OpInfo, kwargs: dict) -> tuple[Any, dict]:
        """The op and kwargs of a random op whose result lives here: it draws from this device's generator (a
        generator of another device is refused, as on a real device)."""
        if info.has_generator:
            gen = kwargs.get("generator")
            if gen is None:
                return func, {**kwargs, "generator": self.generator}
            if gen.device.type != self.device.type:
                raise RuntimeError(
                    f"Expected a '{self.device.type}' device type for generator but found '{gen.device.type}'"
                )
            return func, kwargs
        if info.generator_overload is not None:
            return info.generator_overload, {**kwargs, "generator": self.generator}
        return func, kwargs

    @staticmethod
    def _unwrap(a: Any, elems: dict[int, torch.Tensor]) -> Any:
        t = type(a)
        if t is list or t is tuple:
            return t(VirtualDevice._unwrap(b, elems) for b in a)
        if isinstance(a, torch.Tensor) and "_vowner" in a.__dict__:
            e = _elem(a)
            elems[id(e)] = a
            return e
        return a

    def _rewrap(self, out: Any, elems: dict[int, torch.Tensor]) -> Any:
        if isinstance(out, torch.Tensor):
            original = elems.get(id(out))
            if original is not None and _elem(original) is out:
                if out.shape != original.shape:
                    raise NotImplementedError("virtual device: in-place resize of a virtual tensor")
                return original  # in-place / out=: hand back the caller's tensor
            return self._wrap(out)
        if type(out) in (tuple, list):
            return type(out)(self._rewrap(o, elems) for o in out)
        return out

    def _check_devices(self, func, info: _OpInfo, args: tuple, kwargs: dict) -> None:
        """Raise CUDA's error for a CPU (or meta, ...) tensor where the device needs a device tensor."""
        index_op = func in _INDEX_OPS
        scalar_ok = info.pointwise or index_op or func in _SCALAR_OK
        named = [(info.names[i] if i < len(info.names) else "", a) for i, a in enumerate(args)]
        for name, a in (*named, *kwargs.items()):
            listed = type(a) in (list, tuple)
            for b in a if listed else (a,):
                if not isinstance(b, torch.Tensor) or is_virtual(b):
                    continue
                if b.device.type == "cpu" and name not in info.writes:
                    if index_op and listed:
                        self._record("h2d", func, b)  # CPU indices: copied to the device first, as on CUDA
                        continue
                    if scalar_ok and b.dim() == 0:
                        continue  # a 0-dim CPU tensor passes as a scalar
                raise _same_device_error(self.device, b.device)

    def _item(self, func, args: tuple, kwargs: dict, to_virtual: bool) -> Any:
        self._record("d2h", func, args[0])  # .item(): a sync and a copy on a real device
        return func(_elem(args[0]))

    def _record_stream(self, func, args: tuple, kwargs: dict, to_virtual: bool) -> None:
        """`Tensor.record_stream(stream)`: nothing to defer (work is synchronous, memory is not cached), but as on
        CUDA the stream must be the tensor's device's."""
        stream = args[1]
        if stream.device != self.device:
            raise RuntimeError(f"record_stream: a {stream.device} stream for a tensor on {self.device}")

    def _to_copy(self, func, args: tuple, kwargs: dict, to_virtual: bool) -> Any:
        src = args[0]
        if is_virtual(src):
            if to_virtual or kwargs.get("device") is None:
                return self._wrap(func(_elem(src), **{**kwargs, "device": CPU}))
            out = func(_elem(src), **kwargs)
            if out.device.type == "cpu":
                self._record("d2h", func, src)
            return out  # to cpu (copied) or meta (no data moves)
        if src.device.type == "cpu":
            self._record("h2d", func, src)
        # meta -> device raises NotImplementedError("Cannot copy out of meta tensor"), as on CUDA
        return self._wrap(func(src, **{**kwargs, "device": CPU}))

    def _copy_(self, func, args: tuple, kwargs: dict, to_virtual: bool) -> Any:
        dst, src, rest = args[0], args[1], args[2:]
        if is_virtual(dst):
            if not is_virtual(src):
                if src.device.type != "cpu":
                    raise _same_device_error(self.device, src.device)
                self._record("h2d", func, src)
            func(_elem(dst), _elem(src) if is_virtual(src) else src, *rest, **kwargs)
            return dst
        if dst.device.type == "meta":
            return func(dst, _elem(src), *rest, **kwargs)  # no data moves
        if dst.device.type != "cpu":
            raise _same_device_error(dst.device, self.device)
        self._record("d2h", func, src)
        return func(dst, _elem(src), *rest, **kwargs)

    # ---------------------------------------------------------------- torch functions

    def _sdpa(self, func, args: tuple, kwargs: dict) -> Any:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if not any(is_virtual(t) for t in tensors):
            return func(*args, **kwargs)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return func(*args, **kwargs)  # keep autograd: decomposes at aten level (the math path)
        for t in tensors:
            if not is_virtual(t) and type(t) in _PLAIN:
                raise _same_device_error(self.device, t.device)
        elems: dict[int, torch.Tensor] = {}
        out = func(*(self._unwrap(a, elems) for a in args), **{k: self._unwrap(v, elems) for k, v in kwargs.items()})
        return self._rewrap(out, {})

    def _set_data(self, target: torch.Tensor, value: torch.Tensor) -> Any:
        """`target.data = value` with a virtual side. As CUDA's `set_data`, target keeps its identity, class,
        attributes, requires_grad and grad; it now shares value's storage."""
        if is_virtual(target) and is_virtual(value):
            _DATA.__set__(target, value)  # C++ set_data between two wrapper impls: metadata only
            self._attach(target, _elem(value))
            return None
        if _owns_dispatch(type(value)) and not is_virtual(value):
            return _DATA.__set__(target, value)  # a torchao tensor: not ours to emulate
        grad = target.grad
        if grad is not None:
            target.grad = None
        arriving = is_virtual(value)
        new: torch.Tensor = self._wrap(_elem(value)) if arriving else value.detach()
        new.requires_grad_(target.requires_grad)
        if type(target) is VirtualTensor:
            # Leaving the device: a VirtualTensor (made by Parameter(vt), as accelerate does) becomes what a
            # CUDA tensor is, a Parameter or a Tensor. Its old self, now holding the wrapper, releases memory.
            if getattr(target, "_is_param", False):
                new = torch.nn.Parameter(new, requires_grad=target.requires_grad)
            new.__dict__.update({k: v for k, v in target.__dict__.items() if k not in (*_STATE, "_is_param")})
            torch.utils.swap_tensors(target, new)
        else:
            # Swap only the TensorImpls: target keeps its class and __dict__, the state entries move over.
            self._detach(target)
            torch._C._swap_tensor_impl(target, new)  # new (still a VirtualTensor) releases its count at exit
            if arriving:
                self._attach(target, _elem(new))
        if grad is not None:
            # CUDA leaves the grad where it was until nn.Module._apply moves it; here a grad must match.
            same = grad.device == target.device and grad.dtype == target.dtype
            target.grad = grad if same else grad.to(device=target.device, dtype=target.dtype)
        return None

    def _pin(self, func, args: tuple, kwargs: dict) -> Any:
        """`Tensor.pin_memory()` / `is_pinned()`. With `pinned_memory=True`, as on an accelerator whose runtime pins
        host memory (torch_npu), a pinned copy is an ordinary CPU tensor (here a copy remembered as pinned) and
        pinning it again is a no-op; otherwise torch answers (a CPU build refuses to pin)."""
        t = args[0]
        if not self.pinned_memory or is_virtual(t):
            return func(*args, **kwargs)
        if t.device.type != "cpu":
            raise RuntimeError(f"cannot pin '{t.device}' memory: only dense CPU tensors can be pinned")
        pinned = t.untyped_storage().data_ptr() in self._pinned
        if func is _IS_PINNED:
            return pinned
        if pinned:
            return t
        copy_ = t.clone(memory_format=torch.contiguous_format)
        key = copy_.untyped_storage().data_ptr()
        self._pinned.add(key)
        weakref.finalize(copy_, self._pinned.discard, key)
        return copy_

    def _deepcopy(self, t: torch.Tensor, memo: dict) -> torch.Tensor:
        """copy.deepcopy: a new device tensor with copied data and attributes, not copied bookkeeping."""
        if id(t) in memo:
            return memo[id(t)]
        new = self._wrap(_elem(t).clone())
        new.requires_grad_(t.requires_grad)
        extra = {k: v for k, v in t.__dict__.items() if k not in _STATE}
        new.__dict__.update(copy.deepcopy(extra, memo))
        memo[id(t)] = new
        return new

    def _attach(self, t: torch.Tensor, elem: torch.Tensor) -> None:
        """Make t's __dict__ say it holds elem (t already has the matching wrapper impl)."""
        self._detach(t)
        state = {"_elem": elem, "_vkey": self._acquire(elem), "_vowner": self}
        if type(t) is not VirtualTensor:  # no __del__ on its class: release by finalizer
            state["_vfinal"] = weakref.finalize(t, self._release, state["_vkey"])
        t.__dict__.update(state)

    def _detach(self, t: torch.Tensor) -> None:
        d = t.__dict__
        if "_vowner" not in d:
            return
        final = d.pop("_vfinal", None)
        if final is not None:
            final.detach()
        d.pop("_elem")
        d.pop("_vowner")._release(d.pop("_vkey"))


# aten ops with virtual arguments that are not "run the CPU kernel on the data": VirtualDevice method per op.
_SPECIAL_OPS = {
    _aten._to_copy.default: VirtualDevice._to_copy,
    _aten.copy_.default: VirtualDevice._copy_,
    _aten._local_scalar_dense.default: VirtualDevice._item,
    _aten.record_stream.default: VirtualDevice._record_stream,
}

# torch functions the device handles whatever their arguments (each method decides what is its business).
_FUNCTION_HANDLERS = {
    _SDPA: VirtualDevice._sdpa,
    _PIN_MEMORY: VirtualDevice._pin,
    _IS_PINNED: VirtualDevice._pin,
}
