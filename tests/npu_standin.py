"""A strict CPU stand-in for `torch_npu`, so the NPU backend's contract is tested without Ascend hardware.

`install(monkeypatch)` (or the `npu_standin` fixture) puts a `types.ModuleType("torch_npu")` with a real
`__spec__` into `sys.modules` and a recording `torch.npu` onto torch. The module has no package metadata,
no `__file__` and no `__version__`, so diffusers (metadata-based, decided at import) and transformers (which
treats a module without file or version as absent) still report no NPU and keep their CPU code paths.

The attention ops have the real signatures (torch-npu 2.13/2.14), keyword names
included, so a misspelling such as `pre_tokens` for `pre_tockens` is a TypeError. They check what the device
would reject (layout, head count, dtype, head_dim, mask dtype, dropout), then compute on the CPU tensors they
are given: the NPU mask (True = masked out) is inverted for SDPA, which runs in fp32, and the output comes
back in the input's layout and dtype. No tensor ever lives on a real `npu` device.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from typing import Any

import pytest
import torch
import torch.nn.functional as F

MAX_TOKENS = 2147483647
FUSION_LAYOUTS = ("BSND", "BNSD", "BSH", "SBH")
FUSED_INFER_LAYOUTS = ("BSND", "BNSD", "BSH", "BNSD_BSND")
DEVICE_DTYPES = (torch.float16, torch.bfloat16)
MASK_DTYPES = (torch.bool, torch.uint8)


class StandInError(RuntimeError):
    """What the real op would raise (torch_npu reports bad arguments as RuntimeError)."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise StandInError(message)


# ------------------------------------------------------------------------------------------ torch.npu


class FakeNPUModule:
    """The parts of `torch.npu` the backend uses; every call is recorded in `calls` as (name, args, kwargs)."""

    def __init__(self, available: bool = True, device_count: int = 1):
        self.available = available
        self.count = device_count
        self.calls: list[tuple[str, tuple, dict]] = []
        # torch_npu's default is True; the backend must switch it off.
        self.config = types.SimpleNamespace(allow_internal_format=True)
        self.compile_mode: dict[str, bool] = {}
        self.peak = 1234  # bytes reported by max_memory_allocated

    def _record(self, name: str, *args, **kwargs) -> None:
        self.calls.append((name, args, kwargs))

    def called(self, name: str) -> list[tuple[tuple, dict]]:
        return [(a, k) for n, a, k in self.calls if n == name]

    def is_available(self) -> bool:
        self._record("is_available")
        return self.available

    def device_count(self) -> int:
        self._record("device_count")
        return self.count

    def set_device(self, device) -> None:
        self._record("set_device", device)

    def set_compile_mode(self, *, jit_compile: bool) -> None:
        self._record("set_compile_mode", jit_compile=jit_compile)
        self.compile_mode["jit_compile"] = jit_compile

    def synchronize(self, device=None) -> None:
        self._record("synchronize", device)

    def reset_peak_memory_stats(self, device=None) -> None:
        self._record("reset_peak_memory_stats", device)

    def max_memory_allocated(self, device=None) -> int:
        self._record("max_memory_allocated", device)
        return self.peak

    def memory_allocated(self, device=None) -> int:
        self._record("memory_allocated", device)
        return 0

    def empty_cache(self) -> None:
        self._record("empty_cache")

    # torch.manual_seed also seeds the PrivateUse1 device's module (here: this one) through these two.
    def manual_seed_all(self, seed: int) -> None:
        self._record("manual_seed_all", seed)

    def _is_in_bad_fork(self) -> bool:
        return False

    def get_device_name(self, device=None) -> str:
        self._record("get_device_name", device)
        return "Ascend910B3 (stand-in)"


# ------------------------------------------------------------------------------------------ attention math


def _split(x: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    """Any supported layout -> (B, N, S, D)."""
    if layout in ("BNSD", "BNSD_BSND"):
        return x
    if layout == "BSND":
        return x.transpose(1, 2)
    if layout == "BSH":
        b, s, h = x.shape
        return x.reshape(b, s, heads, h // heads).transpose(1, 2)
    s, b, h = x.shape  # SBH
    return x.transpose(0, 1).reshape(b, s, heads, h // heads).transpose(1, 2)


def _merge(x: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, N, S, D) -> the output layout."""
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


def _check_qkv(op: str, q, k, v, heads: int, layout: str, layouts: tuple[str, ...], strict_dtype: bool) -> int:
    """Validate q/k/v against `layout`; returns head_dim."""
    _require(layout in layouts, f"{op}: input_layout={layout!r} not supported (one of {layouts})")
    _require(isinstance(heads, int) and not isinstance(heads, bool) and heads > 0, f"{op}: head count {heads!r}")
    ndim = 3 if layout in ("BSH", "SBH") else 4
    for name, t in (("query", q), ("key", k), ("value", v)):
        _require(isinstance(t, torch.Tensor), f"{op}: {name} must be a Tensor")
        _require(t.dim() == ndim, f"{op}: {name} has {t.dim()} dims, layout {layout} needs {ndim}")
    _require(k.shape == v.shape, f"{op}: key {tuple(k.shape)} and value {tuple(v.shape)} differ")
    _require(q.dtype == k.dtype == v.dtype, f"{op}: dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    allowed = DEVICE_DTYPES if strict_dtype else (*DEVICE_DTYPES, torch.float32)
    _require(q.dtype in allowed, f"{op}: dtype {q.dtype} not supported (fp16/bf16)")
    if ndim == 4:
        n_axis = 1 if layout.startswith("BNSD") else 2
        s_axis = 3 - n_axis
        _require(q.shape[n_axis] == heads, f"{op}: head count {heads} but {layout} query has N={q.shape[n_axis]}")
        same = [i for i in range(4) if i != s_axis]  # B, N, D shared; sequence lengths may differ
        _require(all(q.shape[i] == k.shape[i] for i in same), f"{op}: query {tuple(q.shape)} vs key {tuple(k.shape)}")
        head_dim = q.shape[3]
    else:
        h = q.shape[2]
        _require(h % heads == 0, f"{op}: hidden size {h} is not divisible by head count {heads}")
        b_axis = 0 if layout == "BSH" else 1
        _require(q.shape[b_axis] == k.shape[b_axis] and h == k.shape[2], f"{op}: query vs key shape")
        head_dim = h // heads
    _require(head_dim % 16 == 0 and head_dim <= 512, f"{op}: head_dim {head_dim} must be a multiple of 16, <= 512")
    return head_dim


def _keep_mask(op: str, mask, b: int, n: int, sq: int, skv: int, pre: int, nxt: int) -> torch.Tensor | None:
    """NPU mask (True/1 = masked out, shape BNSS/B1SS/11SS/SS) -> SDPA keep-mask (True = attend)."""
    if mask is None:
        return None  # dense: the token band is ignored without a mask
    _require(mask.dtype in MASK_DTYPES, f"{op}: atten_mask dtype {mask.dtype} (bool or uint8)")
    shapes = ((b, n, sq, skv), (b, 1, sq, skv), (1, 1, sq, skv), (sq, skv))
    _require(tuple(mask.shape) in shapes, f"{op}: atten_mask shape {tuple(mask.shape)} (BNSS, B1SS, 11SS or SS)")
    keep = mask == 0
    if pre < skv or nxt < skv:  # sparse_mode 0 with a mask: query i sees keys i-pre .. i+next
        offset = torch.arange(skv)[None, :] - torch.arange(sq)[:, None]
        keep = keep & (offset >= -pre) & (offset <= nxt)
    return keep


def _attend(q, k, v, heads: int, layout: str, scale: float, keep, lse: bool = False):
    """fp32 SDPA on the (B, N, S, D) views -> (out in `layout` and the input dtype, logsumexp (B, N, Sq, 1) or None)."""
    qf, kf, vf = (_split(t, layout, heads).float() for t in (q, k, v))
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=keep, scale=scale)
    logsumexp = None
    if lse:
        scores = (qf @ kf.transpose(-1, -2)) * scale  # (B, N, Sq, Skv)
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        logsumexp = scores.logsumexp(-1, keepdim=True)
    return _merge(out.to(q.dtype), layout), logsumexp


# ------------------------------------------------------------------------------------------ the module


class StandIn:
    """The `torch_npu` stand-in and its recorder. `strict_dtype` (default True) rejects fp32 as the device
    does; set it False only to compare the stand-in's own numerics with SDPA in fp32 (layout and mask
    tests), where bf16 rounding would blur an exact comparison."""

    def __init__(self, available: bool = True, device_count: int = 1):
        self.strict_dtype = True
        self.calls: list[tuple[str, dict]] = []  # (op, arguments) of each attention call
        self.npu = FakeNPUModule(available, device_count)
        module = types.ModuleType("torch_npu")
        # A real spec: importlib.util.find_spec("torch_npu") returns it (a None spec would raise ValueError).
        module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
        module.npu_fusion_attention = self.npu_fusion_attention
        module.npu_fused_infer_attention_score = self.npu_fused_infer_attention_score
        module.npu = self.npu
        module.standin = self
        self.module = module

    def npu_fusion_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        head_num: int,
        input_layout: str,
        *,
        pse: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        atten_mask: torch.Tensor | None = None,
        scale: float = 1.0,
        keep_prob: float = 1.0,
        pre_tockens: int = MAX_TOKENS,
        next_tockens: int = MAX_TOKENS,
        inner_precise: int = 0,
        prefix: list[int] | None = None,
        actual_seq_qlen: list[int] | None = None,
        actual_seq_kvlen: list[int] | None = None,
        sparse_mode: int = 0,
        gen_mask_parallel: bool = True,
        sync: bool = False,
    ) -> tuple:
        op = "npu_fusion_attention"
        head_dim = _check_qkv(op, query, key, value, head_num, input_layout, FUSION_LAYOUTS, self.strict_dtype)
        _require(
            isinstance(scale, (float, int)) and not isinstance(scale, bool) and scale > 0, f"{op}: scale {scale!r}"
        )
        _require(keep_prob == 1.0, f"{op}: keep_prob={keep_prob} (dropout at inference)")
        _require(pse is None and padding_mask is None and prefix is None, f"{op}: pse/padding_mask/prefix not modelled")
        _require(actual_seq_qlen is None and actual_seq_kvlen is None, f"{op}: TND (variable length) not modelled")
        _require(sparse_mode == 0, f"{op}: sparse_mode={sparse_mode} not modelled (0 only)")
        self.calls.append(
            (
                op,
                dict(
                    shape=tuple(query.shape),
                    dtype=query.dtype,
                    head_num=head_num,
                    input_layout=input_layout,
                    scale=float(scale),
                    head_dim=head_dim,
                    atten_mask=atten_mask is not None,
                    pre_tockens=pre_tockens,
                    next_tockens=next_tockens,
                    keep_prob=keep_prob,
                ),
            )
        )
        q4 = _split(query, input_layout, head_num)  # (B, N, Sq, D)
        skv = _split(key, input_layout, head_num).shape[2]
        b, n, sq = q4.shape[:3]
        keep = _keep_mask(op, atten_mask, b, n, sq, skv, pre_tockens, next_tockens)
        out, _ = _attend(query, key, value, head_num, input_layout, float(scale), keep)
        softmax_max = torch.zeros(b, n, sq, 8)  # fp32, as the device returns them
        softmax_sum = torch.zeros(b, n, sq, 8)
        return out, softmax_max, softmax_sum, torch.empty(0, dtype=query.dtype), 0, 0, 0

    def npu_fused_infer_attention_score(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        pse_shift: torch.Tensor | None = None,
        atten_mask: torch.Tensor | None = None,
        actual_seq_lengths: list[int] | None = None,
        actual_seq_lengths_kv: list[int] | None = None,
        dequant_scale1: Any = None,
        quant_scale1: Any = None,
        dequant_scale2: Any = None,
        quant_scale2: Any = None,
        quant_offset2: Any = None,
        antiquant_scale: Any = None,
        antiquant_offset: Any = None,
        block_table: Any = None,
        query_padding_size: Any = None,
        kv_padding_size: Any = None,
        key_antiquant_scale: Any = None,
        key_antiquant_offset: Any = None,
        value_antiquant_scale: Any = None,
        value_antiquant_offset: Any = None,
        key_shared_prefix: Any = None,
        value_shared_prefix: Any = None,
        actual_shared_prefix_len: Any = None,
        query_rope: Any = None,
        key_rope: Any = None,
        key_rope_antiquant_scale: Any = None,
        num_heads: int = 1,
        scale: float = 1.0,
        pre_tokens: int = MAX_TOKENS,
        next_tokens: int = MAX_TOKENS,
        input_layout: str = "BSH",
        num_key_value_heads: int = 0,
        sparse_mode: int = 0,
        inner_precise: int = 0,
        block_size: int = 0,
        antiquant_mode: int = 0,
        softmax_lse_flag: bool = False,
        key_antiquant_mode: int = 0,
        value_antiquant_mode: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        op = "npu_fused_infer_attention_score"
        head_dim = _check_qkv(op, query, key, value, num_heads, input_layout, FUSED_INFER_LAYOUTS, self.strict_dtype)
        for name, t in (("query", query), ("key", key), ("value", value)):
            _require(t.is_contiguous(), f"{op}: {name} is not contiguous")
        _require(
            isinstance(scale, (float, int)) and not isinstance(scale, bool) and scale > 0, f"{op}: scale {scale!r}"
        )
        _require(num_key_value_heads in (0, num_heads), f"{op}: grouped KV heads not modelled")
        extras = (pse_shift, actual_seq_lengths, actual_seq_lengths_kv, block_table, query_rope, key_rope)
        quant = (dequant_scale1, quant_scale1, dequant_scale2, quant_scale2, quant_offset2, antiquant_scale)
        _require(all(x is None for x in extras + quant), f"{op}: paged/quantized/variable-length modes not modelled")
        _require(sparse_mode == 0, f"{op}: sparse_mode={sparse_mode} not modelled (0 only)")
        self.calls.append(
            (
                op,
                dict(
                    shape=tuple(query.shape),
                    dtype=query.dtype,
                    num_heads=num_heads,
                    input_layout=input_layout,
                    scale=float(scale),
                    head_dim=head_dim,
                    atten_mask=atten_mask is not None,
                ),
            )
        )
        q4 = _split(query, input_layout, num_heads)
        skv = _split(key, input_layout, num_heads).shape[2]
        b, n, sq = q4.shape[:3]
        if atten_mask is not None:  # int8 is also accepted here
            _require(atten_mask.dtype in (*MASK_DTYPES, torch.int8), f"{op}: atten_mask dtype {atten_mask.dtype}")
            atten_mask = atten_mask.to(torch.uint8) if atten_mask.dtype == torch.int8 else atten_mask
        keep = _keep_mask(op, atten_mask, b, n, sq, skv, pre_tokens, next_tokens)
        out, lse = _attend(query, key, value, num_heads, input_layout, float(scale), keep, lse=softmax_lse_flag)
        return out, (lse if lse is not None else torch.empty(1))  # the device returns a 1-element lse when off


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
    monkeypatch.setattr(torch, "npu", standin.npu, raising=False)
    return standin


def uninstall() -> None:
    """Forget vendor answers cached while the stand-in was installed."""
    for check in _vendor_npu_checks():
        check.cache_clear()


@pytest.fixture
def npu_standin(monkeypatch: pytest.MonkeyPatch):
    """The stand-in `torch_npu` (one visible device) for one test."""
    standin = install(monkeypatch)
    yield standin
    uninstall()
