"""The NPU backend's contract, on CPU, against the strict torch_npu stand-in (tests/npu_standin.py).

The stand-in's ops reject tensors that are not on the NPU, as the real ones do. Placement and whole runs use
`npu_device`: real "npu" tensors from the virtual device (tests/virtual_device.py presenting PrivateUse1), so
diffusers' and accelerate's hooks really move weights there and any op mixing devices raises. Kernel numerics use
`npu_cpu`, which lets CPU tensors play the NPU's.
What waits for hardware is marked `npu` and skips without torch_npu: the real kernels at ContentV's shape.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import math
import os
import re
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
from contentv.config import BackendConfig, MemoryConfig, ModelConfig, RunConfig
from contentv.errors import ConfigError
from contentv.models.contentv.attention import ContentVJointAttnProcessor
from contentv.models.contentv.transformer import SD3Transformer3DModel
from contentv.runtime import Runtime
from tests.npu_standin import SCHEMA_FILE, SCHEMAS, NotModelled, StandIn, StandInError, install, uninstall
from tests.virtual_device import VirtualDevice

ROOT = Path(__file__).resolve().parents[1]
# A real torch_npu (an Ascend machine) has package metadata and a real torch.npu, which the
# stand-in's isolation checks assume absent.
HAS_TORCH_NPU = importlib.util.find_spec("torch_npu") is not None
isolation_only = pytest.mark.skipif(HAS_TORCH_NPU, reason="a real torch_npu is installed")
FUSION, FUSED_INFER = "npu_fusion_attention", "npu_fused_infer_attention_score"
TEMPLATE = torch.ones(2048, 2048, dtype=torch.bool).triu(1)  # the compressed causal mask sparse modes 2-4 take


@pytest.fixture
def npu(monkeypatch: pytest.MonkeyPatch):
    """The stand-in torch_npu with one visible device; its ops take only tensors on the NPU."""
    standin = install(monkeypatch)
    yield standin
    uninstall()


@pytest.fixture
def npu_cpu(npu: StandIn) -> StandIn:
    """The stand-in, with CPU tensors counting as on the NPU: numerics without a virtual device."""
    npu.is_on_device = lambda tensor: tensor.device.type == "cpu"
    return npu


def _qkv(b: int, n: int, s: int, d: int, dtype=torch.float32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, s, d, generator=g).to(dtype) for _ in range(3)]  # (B, N, S, D)


def _randn(*shape: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


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


def _sdpa(q, k, v, keep=None, scale=None) -> torch.Tensor:
    """fp32 reference on (B, N, S, D); keep: True = attend (SDPA's convention); GQA by key/value head groups."""
    return F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=keep, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def _band(sq: int, skv: int, pre: int, nxt: int, shift: int = 0) -> torch.Tensor:
    offset = torch.arange(skv)[None, :] - torch.arange(sq)[:, None] - shift
    return (offset >= -pre) & (offset <= nxt)


def _bf16_close(out: torch.Tensor, expected: torch.Tensor) -> None:
    """The stand-in computes in fp32 and rounds once: within one bf16 rounding step of the fp32 reference."""
    torch.testing.assert_close(out.float(), expected.float().to(torch.bfloat16).float(), rtol=2**-7, atol=2**-9)


# ------------------------------------------------------------------------------------------ the schema


def _schema_params(schema: str) -> list[tuple[str, bool, object]]:
    """(name, keyword-only, default or Ellipsis) per parameter, read off the schema text without torch."""
    params, keyword_only = [], False
    for part in (p.strip() for p in schema[schema.index("(") + 1 : schema.rindex(") ->")].split(",")):
        if part == "*":
            keyword_only = True
            continue
        declaration, _, default = part.partition("=")
        params.append((declaration.split()[-1], keyword_only, ast.literal_eval(default) if default else ...))
    return params


def test_schema_excerpt_names_its_source():
    text = SCHEMA_FILE.read_text()
    header = dict(re.findall(r"^# (wheel|path|sha256|date): +(.+)$", text, re.M))
    assert re.fullmatch(
        r"torch_npu-2\.1[34]\.\d+-cp\d+-cp\d+-\w+\.whl \(torch-npu 2\.1[34]\.\d+, .+\)", header["wheel"]
    )
    assert header["path"] == "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"
    assert re.fullmatch(r"[0-9a-f]{64}", header["sha256"]) and re.fullmatch(r"\d{4}-\d\d-\d\d", header["date"])
    assert (ROOT / "tests" / "npu_schema" / "refresh.py").exists()
    assert set(SCHEMAS) == {FUSION, FUSED_INFER}
    # torch_npu lists the fused-infer op twice (custom and symint): the excerpt keeps both, and they agree.
    funcs = re.findall(r"^(?:- |  )func: (.+)$", text, re.M)
    assert sorted(funcs) == sorted([SCHEMAS[FUSION], SCHEMAS[FUSED_INFER], SCHEMAS[FUSED_INFER]])


@pytest.mark.parametrize("op", [FUSION, FUSED_INFER])
def test_signatures_are_the_schemas(npu: StandIn, op: str):
    import torch_npu

    signature = inspect.signature(getattr(torch_npu, op))
    assert [
        (p.name, p.kind == p.KEYWORD_ONLY, ... if p.default is p.empty else p.default)
        for p in signature.parameters.values()
    ] == _schema_params(SCHEMAS[op])
    defaults = {p.name: p.default for p in signature.parameters.values()}
    if op == FUSION:  # positional all the way, `tockens` spelling, scale defaults to 1.0 (not 1/sqrt(D))
        assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in signature.parameters.values())
        assert list(defaults)[:5] == ["query", "key", "value", "head_num", "input_layout"]
        assert defaults["pre_tockens"] == defaults["next_tockens"] == 2**31 - 1 and defaults["scale"] == 1.0
        assert list(defaults)[-5:] == ["softmax_layout", "sink", "dropout_mask", "seed", "offset"]
    else:  # keyword-only after value; num_heads defaults to 1, the layout to BSH
        kinds = [p.kind for p in signature.parameters.values()]
        assert kinds[:3] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 3
        assert set(kinds[3:]) == {inspect.Parameter.KEYWORD_ONLY}
        assert defaults["num_heads"] == 1 and defaults["input_layout"] == "BSH" and "scale_value" not in defaults


def test_standin_binds_arguments_as_torch_does(npu_cpu: StandIn):
    """torch's own parser binds the calls: a misspelled keyword or an extra positional is a RuntimeError."""
    import torch_npu

    q, k, v = _qkv(1, 2, 8, 16, torch.bfloat16)
    with pytest.raises(RuntimeError, match="pre_tokens"):  # npu_fusion_attention spells it pre_tockens
        torch_npu.npu_fusion_attention(q, k, v, 2, "BNSD", pre_tokens=65536)
    with pytest.raises(RuntimeError, match="scale_value"):  # renamed to scale in current torch_npu
        torch_npu.npu_fused_infer_attention_score(q, k, v, num_heads=2, input_layout="BNSD", scale_value=0.25)
    with pytest.raises(RuntimeError, match="takes 3 positional"):  # keyword-only after value
        torch_npu.npu_fused_infer_attention_score(q, k, v, None)
    with pytest.raises(RuntimeError, match="head_num"):  # int, not float
        torch_npu.npu_fusion_attention(q, k, v, 2.0, "BNSD")
    with pytest.raises(RuntimeError, match="missing value for argument 'input_layout'"):
        torch_npu.npu_fusion_attention(q, k, v, 2)
    assert npu_cpu.calls == []
    # The real op is not keyword-only after input_layout: pse, padding_mask, atten_mask, scale by position.
    by_position = torch_npu.npu_fusion_attention(q, k, v, 2, "BNSD", None, None, None, 0.25)[0]
    assert torch.equal(by_position, torch_npu.npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.25)[0])


# ------------------------------------------------------------------------------------------ the device


@pytest.mark.parametrize("op", [FUSION, FUSED_INFER])
def test_ops_reject_tensors_not_on_the_npu(npu: StandIn, op: str):
    import torch_npu

    q, k, v = _qkv(1, 2, 8, 16, torch.bfloat16)
    assert not npu.is_on_device(q)
    call = getattr(torch_npu, op)
    kwargs = dict(head_num=2, input_layout="BNSD") if op == FUSION else dict(num_heads=2, input_layout="BNSD")
    with pytest.raises(NotImplementedError) as err:  # the dispatcher finds no CPU kernel
        call(q, k, v, **kwargs)
    assert type(err.value) is NotImplementedError and f"Could not run 'npu::{op}'" in str(err.value)
    assert "'CPU' backend" in str(err.value)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    npu.is_on_device = lambda tensor: tensor is not mask  # everything but the mask on the NPU
    with pytest.raises(StandInError, match="only npu tensor is supported .*atten_mask"):
        call(q, k, v, atten_mask=mask, **kwargs)
    assert npu.calls == []


# ------------------------------------------------------------------------------------------ npu_fusion_attention


@pytest.mark.parametrize(
    "layout, heads, shape",
    [("BNSD", 3, (1, 2, 8, 16)), ("BSND", 4, (1, 8, 2, 16)), ("BSH", 3, (1, 8, 32)), ("SBH", 5, (8, 1, 32))],
)
def test_standin_rejects_wrong_head_num(npu_cpu: StandIn, layout: str, heads: int, shape: tuple[int, ...]):
    import torch_npu

    q = torch.zeros(shape, dtype=torch.bfloat16)
    with pytest.raises(StandInError, match="head"):
        torch_npu.npu_fusion_attention(q, q, q, heads, input_layout=layout, scale=0.25)


def _fusion_case(change: dict) -> dict:
    """BNSD q/k/v (B=1, N=2, S=8, D=16, bf16) with one thing changed."""
    nq, nkv = change.get("heads", (2, 2))
    d, dv = change.get("dims", (16, 16))
    dtype = change.get("dtype", torch.bfloat16)
    args = dict(
        query=_randn(1, nq, 8, d, dtype=dtype),
        key=_randn(1, nkv, 8, d, dtype=dtype, seed=1),
        value=_randn(1, nkv, 8, dv, dtype=dtype, seed=2),
        head_num=nq,
        input_layout=change.get("layout", "BNSD"),
        keep_prob=change.get("keep_prob", 1.0),
        sparse_mode=change.get("sparse_mode", 0),
    )
    if "query" in change:
        args["query"] = change["query"]
    if "mask" in change:
        args["atten_mask"] = change["mask"]
    return args


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(query=torch.zeros(8, 16, dtype=torch.bfloat16)), "3 or 4 dimensional"),  # op_plugin
        (dict(keep_prob=0.0), r"keep_prob value must be in range of \(0, 1\]"),
        (dict(keep_prob=1.5), r"keep_prob value must be in range of \(0, 1\]"),
        (dict(sparse_mode=7), r"sparse_mode value must be in range of \[0,6\]"),  # 7, 8: TND only
        (dict(sparse_mode=-1), r"sparse_mode value must be in range of \[0,6\]"),
        (dict(layout="TND"), "actual_seq_qlen and actual_seq_kvlen must be the same and cannot be empty"),
        (dict(layout="BHSD"), "input_layout should be BSH/SBH/BNSD/BSND/TND"),
        (dict(dtype=torch.float64), "dtype"),  # docs: fp16, bf16, fp32
        (dict(dims=(769, 769)), "head_dim 769"),  # docs: D 1..768
        (dict(dims=(16, 32)), "Dv=32 exceeds Dk=16"),  # docs: Dk >= Dv
        (dict(heads=(3, 2)), "GQA needs Nq % Nkv == 0"),
        (dict(heads=(257, 257)), r"257 query heads \(1..256\)"),
        (dict(mask=torch.zeros(8, 8, dtype=torch.float16)), "atten_mask dtype"),  # docs: bool, uint8
        (dict(mask=torch.zeros(1, 8, 8, dtype=torch.bool)), "atten_mask shape"),  # BNSS, B1SS, 11SS, SS
        (dict(mask=torch.zeros(8, 8, dtype=torch.bool), sparse_mode=2), "atten_mask shape"),  # 2048x2048
    ],
)
def test_fusion_rejects_what_the_op_rejects(npu_cpu: StandIn, change: dict, match: str):
    import torch_npu

    with pytest.raises(StandInError, match=match):
        torch_npu.npu_fusion_attention(**_fusion_case(change))
    assert npu_cpu.calls == []


@pytest.mark.parametrize(
    "change, what",
    [
        (dict(keep_prob=0.9), "dropout"),  # valid, but the device's Philox mask can't be reproduced
        (dict(layout="TND"), "TND"),
        (dict(sparse_mode=5, mask=torch.zeros(1, 2, 8, 8, dtype=torch.bool)), "prefix"),
        (dict(sparse_mode=3, mask=torch.zeros(2048, 2048, dtype=torch.bool)), "non-template mask"),
        (dict(mask=torch.ones(8, 8, dtype=torch.bool)), "all masked out"),
    ],
)
def test_fusion_says_what_it_does_not_model(npu_cpu: StandIn, change: dict, what: str):
    import torch_npu

    args = _fusion_case(change)
    if what == "TND":  # (T, N, D) with cumulative lengths: accepted by the op, not computed here
        args.update(query=args["query"][0].transpose(0, 1).contiguous(), actual_seq_qlen=[8], actual_seq_kvlen=[8])
        args.update(key=args["key"][0].transpose(0, 1).contiguous(), value=args["value"][0].transpose(0, 1))
    with pytest.raises(NotModelled, match=what):
        torch_npu.npu_fusion_attention(**args)


@pytest.mark.parametrize(
    "case",
    ["fp32", "head_dim_24", "head_dim_600", "lower_case_layout", "gqa", "gqa_bsh", "dv_below_dk", "negative_scale"],
)
def test_fusion_accepts_what_the_op_accepts(npu_cpu: StandIn, case: str):
    """Each of these the old stand-in refused; the real op takes them (docs 约束说明, op_plugin)."""
    import torch_npu

    nq, nkv, d, dv, layout, scale = 4, 4, 16, 16, "BNSD", 0.25
    nkv = 2 if case.startswith("gqa") else nkv
    d = {"head_dim_24": 24, "head_dim_600": 600}.get(case, d)
    dv = 8 if case == "dv_below_dk" else d
    layout = {"lower_case_layout": "bsnd", "gqa_bsh": "BSH"}.get(case, layout)
    scale = -0.25 if case == "negative_scale" else scale
    q, k, v = _randn(2, nq, 6, d), _randn(2, nkv, 10, d, seed=1), _randn(2, nkv, 10, dv, seed=2)
    dtype = torch.float32 if case in ("fp32", "head_dim_600", "gqa_bsh") else torch.bfloat16
    args = [_to_layout(t, layout.upper()).to(dtype) for t in (q, k, v)]
    out = torch_npu.npu_fusion_attention(*args, nq, layout, scale=scale)[0]
    assert out.dtype == dtype and out.shape == _to_layout(torch.empty(2, nq, 6, dv), layout.upper()).shape
    expected = _sdpa(
        *(_from_layout(t, layout.upper(), n) for t, n in zip(args, (nq, nkv, nkv), strict=True)), scale=scale
    )
    if dtype == torch.float32:
        torch.testing.assert_close(_from_layout(out, layout.upper(), nq), expected, rtol=1e-5, atol=1e-5)
    else:
        _bf16_close(_from_layout(out, layout.upper(), nq), expected)
    [(op, call)] = npu_cpu.calls
    assert op == FUSION and call["kv_heads"] == nkv and call["head_dim"] == d and call["input_layout"] == layout


def test_fusion_returns_its_seven_outputs(npu_cpu: StandIn):
    """attention_out, softmax_max, softmax_sum (fp32, (B, N, Sq, 8)), softmax_out (reserved), seed, offset, numels."""
    import torch_npu

    q, k, v = _randn(2, 3, 6, 16), _randn(2, 3, 10, 16, seed=1), _randn(2, 3, 10, 8, seed=2)
    args = [_to_layout(t, "BSND").to(torch.bfloat16) for t in (q, k, v)]
    result = torch_npu.npu_fusion_attention(*args, 3, "BSND", scale=0.25)
    assert isinstance(result, tuple) and len(result) == 7
    out, softmax_max, softmax_sum, softmax_out, seed, offset, numels = result
    assert out.shape == (2, 6, 3, 8) and out.dtype == torch.bfloat16  # the input's layout and dtype, value's D
    assert softmax_max.shape == softmax_sum.shape == (2, 3, 6, 8) and softmax_max.dtype == torch.float32
    assert torch.equal(softmax_max, softmax_max[..., :1].expand_as(softmax_max))
    scores = (_from_layout(args[0], "BSND", 3).float() @ _from_layout(args[1], "BSND", 3).float().mT) * 0.25
    lse = softmax_max[..., :1] + softmax_sum[..., :1].log()
    torch.testing.assert_close(lse, scores.logsumexp(-1, keepdim=True))
    assert softmax_out.numel() == 0 and softmax_out.dtype == torch.bfloat16
    assert (seed, offset, numels) == (0, 0, 2 * 3 * 6 * 10)


@pytest.mark.parametrize("mask_shape", [(8, 12), (1, 1, 8, 12), (2, 1, 8, 12), (2, 3, 8, 12)])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8])
def test_fusion_mask_true_means_masked_out(npu_cpu: StandIn, mask_shape: tuple[int, ...], mask_dtype: torch.dtype):
    import torch_npu

    q = _qkv(2, 3, 8, 16)[0]  # fp32: exact against SDPA
    k, v = _qkv(2, 3, 12, 16, seed=1)[:2]
    masked = torch.rand(mask_shape, generator=torch.Generator().manual_seed(2)) < 0.5  # True = masked out
    masked[..., 0] = False  # every query keeps at least one key
    scale = 1 / math.sqrt(16)
    out = torch_npu.npu_fusion_attention(q, k, v, 3, "BNSD", atten_mask=masked.to(mask_dtype), scale=scale)[0]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=~masked), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, F.scaled_dot_product_attention(q, k, v, attn_mask=masked))


def test_standin_token_band_applies_only_with_a_mask(npu_cpu: StandIn):
    """Why the backend never passes the reference's pre/next_tockens=65536 with a mask: they band-limit."""
    import torch_npu

    q, k, v = _qkv(1, 2, 10, 16)
    nothing = torch.zeros(10, 10, dtype=torch.bool)
    banded = torch_npu.npu_fusion_attention(
        q, k, v, 2, input_layout="BNSD", atten_mask=nothing, scale=0.25, pre_tockens=2, next_tockens=1
    )[0]
    torch.testing.assert_close(
        banded, F.scaled_dot_product_attention(q, k, v, attn_mask=_band(10, 10, 2, 1), scale=0.25)
    )
    dense = torch_npu.npu_fusion_attention(q, k, v, 2, input_layout="BNSD", scale=0.25, pre_tockens=2, next_tockens=1)
    torch.testing.assert_close(dense[0], F.scaled_dot_product_attention(q, k, v, scale=0.25))
    # The fused-infer op alike (its keywords spelled pre_tokens/next_tokens).
    half = [t.to(torch.bfloat16) for t in (q, k, v)]
    kwargs = dict(num_heads=2, input_layout="BNSD", scale=0.25, pre_tokens=2, next_tokens=1)
    banded = torch_npu.npu_fused_infer_attention_score(*half, atten_mask=nothing, **kwargs)[0]
    _bf16_close(banded, _sdpa(*half, _band(10, 10, 2, 1), scale=0.25))
    _bf16_close(torch_npu.npu_fused_infer_attention_score(*half, **kwargs)[0], _sdpa(*half, scale=0.25))


@pytest.mark.parametrize("mode", [1, 2, 3, 4])
def test_fusion_sparse_modes(npu_cpu: StandIn, mode: int):
    """1 allMask (the mask alone); 2 leftUpCausal; 3 rightDownCausal; 4 band from the bottom-right corner (docs 表1)."""
    import torch_npu

    q, (k, v) = _qkv(1, 2, 6, 16)[0], _qkv(1, 2, 10, 16, seed=1)[:2]
    full = torch.rand(6, 10, generator=torch.Generator().manual_seed(3)) < 0.4
    full[:, -1] = False
    mask = full if mode == 1 else TEMPLATE
    keep = {1: ~full, 2: _band(6, 10, 2**31, 0), 3: _band(6, 10, 2**31, 0, 4), 4: _band(6, 10, 2, 1, 4)}[mode]
    out = torch_npu.npu_fusion_attention(
        q, k, v, 2, "BNSD", atten_mask=mask, scale=0.25, sparse_mode=mode, pre_tockens=2, next_tockens=1
    )[0]
    torch.testing.assert_close(out, _sdpa(q, k, v, keep, scale=0.25), rtol=1e-5, atol=1e-6)
    # Without a mask every sparse mode computes densely (docs: "当atten_mask输入为None时 ... 固定为全计算").
    dense = torch_npu.npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.25, sparse_mode=mode)[0]
    torch.testing.assert_close(dense, _sdpa(q, k, v, scale=0.25), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["BSND", "BNSD", "BSH", "SBH"])
def test_standin_every_layout_equals_sdpa(npu_cpu: StandIn, layout: str):
    import torch_npu

    q, k, v = _qkv(2, 3, 10, 32)
    scale = 1 / math.sqrt(32)
    expected = F.scaled_dot_product_attention(q, k, v)
    args = [_to_layout(t, layout) for t in (q, k, v)]
    out = torch_npu.npu_fusion_attention(*args, 3, input_layout=layout, scale=scale)[0]
    assert out.shape == args[0].shape
    torch.testing.assert_close(_from_layout(out, layout, 3), expected, rtol=1e-5, atol=1e-6)
    if layout != "SBH":  # the fused-infer op has no SBH, and takes fp16/bf16 only
        half = [t.to(torch.bfloat16) for t in args]
        out = torch_npu.npu_fused_infer_attention_score(*half, num_heads=3, input_layout=layout, scale=scale)[0]
        assert out.shape == args[0].shape and out.dtype == torch.bfloat16
        _bf16_close(_from_layout(out, layout, 3), _sdpa(*(_from_layout(t, layout, 3) for t in half)))


# ---------------------------------------------------------------------------------- npu_fused_infer_attention_score


def _infer_case(change: dict) -> tuple[list, dict]:
    """BNSD bf16 q (B=2, N=4, Sq=8, D=16), k/v (Skv=12) with one thing changed."""
    nq, nkv = change.get("heads", (4, 4))
    d = change.get("head_dim", 16)
    dtype = change.get("dtype", torch.bfloat16)
    q, k = _randn(2, nq, 8, d, dtype=dtype), _randn(2, nkv, 12, d, dtype=dtype, seed=1)
    v = _randn(2, nkv, 12, change.get("value_dim", d), dtype=dtype, seed=2)
    kwargs = dict(num_heads=nq, input_layout=change.get("layout", "BNSD"), scale=0.25)
    kwargs.update({key: change[key] for key in ("atten_mask", "sparse_mode", "num_key_value_heads") if key in change})
    return [q, k, v], kwargs


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(dtype=torch.float32), "dtype"),  # docs: float16, bfloat16, int8; no fp32
        (dict(layout="bnsd"), "input_layout 'bnsd'"),  # handed to aclnn as given: no upper-casing
        (dict(layout="SBH"), "input_layout 'SBH'"),
        (dict(value_dim=8), "key .* and value .* differ"),  # docs: key, value shapes identical
        (dict(heads=(4, 2)), "key has 2 heads"),  # num_key_value_heads must say so
        (dict(heads=(4, 3), num_key_value_heads=3), "num_heads 4 vs num_key_value_heads 3"),
        (dict(head_dim=528), r"head_dim 528 \(<= 512\)"),
        (dict(head_dim=136), "not 16-aligned and > 128"),
        (dict(atten_mask=torch.zeros(2, 4, 8, 12, dtype=torch.bool)), "no per-head form"),
        (dict(atten_mask=torch.zeros(8, 12, dtype=torch.float16)), "atten_mask dtype"),
        (dict(sparse_mode=5, atten_mask=TEMPLATE), "sparse_mode 5"),  # 0-4 only; 5-8 "暂未实现"
        (dict(sparse_mode=1), "allMask"),  # needs the full mask
        (dict(sparse_mode=3), "needs the compressed atten_mask"),
        (dict(sparse_mode=4, atten_mask=torch.zeros(8, 12, dtype=torch.bool)), "atten_mask shape"),
    ],
)
def test_fused_infer_rejects_what_the_op_rejects(npu_cpu: StandIn, change: dict, match: str):
    import torch_npu

    args, kwargs = _infer_case(change)
    with pytest.raises(StandInError, match=match):
        torch_npu.npu_fused_infer_attention_score(*args, **kwargs)
    assert npu_cpu.calls == []


@pytest.mark.parametrize(
    "change, what",
    [
        (dict(dtype=torch.int8), "int8"),
        (dict(layout="TND"), "TND"),
        (dict(head_dim=24), "unaligned head_dim 24"),  # the docs contradict each other below 128
        (dict(atten_mask=torch.ones(8, 12, dtype=torch.bool)), "all masked out"),
    ],
)
def test_fused_infer_says_what_it_does_not_model(npu_cpu: StandIn, change: dict, what: str):
    import torch_npu

    args, kwargs = _infer_case(change)
    with pytest.raises(NotModelled, match=what):
        torch_npu.npu_fused_infer_attention_score(*args, **kwargs)


@pytest.mark.parametrize("mask_shape", [(8, 12), (1, 8, 12), (2, 8, 12), (1, 1, 8, 12), (2, 1, 8, 12)])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int8, torch.uint8])
def test_fused_infer_documented_masks(npu_cpu: StandIn, mask_shape: tuple[int, ...], mask_dtype: torch.dtype):
    """(Sq, Skv), (B|1, Sq, Skv), (B|1, 1, Sq, Skv); True/1 = masked out."""
    import torch_npu

    args, kwargs = _infer_case({})
    masked = torch.rand(mask_shape, generator=torch.Generator().manual_seed(2)) < 0.5
    masked[..., 0] = False
    out = torch_npu.npu_fused_infer_attention_score(*args, atten_mask=masked.to(mask_dtype), **kwargs)[0]
    keep = ~masked[:, None] if masked.dim() == 3 else ~masked
    _bf16_close(out, _sdpa(*args, keep, scale=0.25))
    assert not torch.allclose(out.float(), _sdpa(*args, ~keep, scale=0.25), atol=1e-2)


def test_fused_infer_gqa_lse_and_bnsd_bsnd(npu_cpu: StandIn):
    import torch_npu

    q, k = _randn(2, 4, 8, 32, dtype=torch.float16), _randn(2, 2, 12, 32, dtype=torch.float16, seed=1)
    v = _randn(2, 2, 12, 32, dtype=torch.float16, seed=2)
    out, lse = torch_npu.npu_fused_infer_attention_score(
        q, k, v, num_heads=4, num_key_value_heads=2, input_layout="BNSD_BSND", scale=0.25, softmax_lse_flag=True
    )
    assert out.shape == (2, 8, 4, 32) and out.dtype == torch.float16  # BNSD in, BSND out
    torch.testing.assert_close(out.transpose(1, 2).float(), _sdpa(q, k, v, scale=0.25), rtol=2**-9, atol=2**-10)
    scores = (q.float() @ k.float().repeat_interleave(2, 1).mT) * 0.25
    assert lse.shape == (2, 4, 8, 1) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, scores.logsumexp(-1, keepdim=True))
    _, off = torch_npu.npu_fused_infer_attention_score(q, k, v, num_heads=4, num_key_value_heads=2, input_layout="BNSD")
    assert off.shape == (1,) and off.dtype == torch.float32 and off.item() == 0  # lse off: a 1-element 0


@pytest.mark.parametrize("mode", [2, 3, 4])
def test_fused_infer_sparse_modes(npu_cpu: StandIn, mode: int):
    import torch_npu

    args, kwargs = _infer_case({})
    keep = {2: _band(8, 12, 2**31, 0), 3: _band(8, 12, 2**31, 0, 4), 4: _band(8, 12, 2, 1, 4)}[mode]
    out = torch_npu.npu_fused_infer_attention_score(
        *args, atten_mask=TEMPLATE[None], sparse_mode=mode, pre_tokens=2, next_tokens=1, **kwargs
    )[0]
    _bf16_close(out, _sdpa(*args, keep, scale=0.25))


def test_fused_infer_rejects_non_contiguous(npu_cpu: StandIn):
    import torch_npu

    q = torch.zeros(1, 8, 2, 16, dtype=torch.bfloat16).transpose(1, 2)  # a BNSD view, not contiguous
    with pytest.raises(StandInError, match="query is not contiguous"):
        torch_npu.npu_fused_infer_attention_score(q, q, q, num_heads=2, input_layout="BNSD", scale=0.25)
    q = q.contiguous()
    mask = torch.zeros(8, 16, dtype=torch.bool)[:, ::2]  # a strided view
    with pytest.raises(StandInError, match="atten_mask is not contiguous"):
        torch_npu.npu_fused_infer_attention_score(q, q, q, num_heads=2, input_layout="BNSD", atten_mask=mask)


# ------------------------------------------------------------------------------------------ torch.npu


def test_torch_npu_device_memory_and_streams(npu: StandIn):
    assert not torch.npu.is_initialized()
    torch.npu.set_device(torch.device("npu", 0))
    assert torch.npu.is_initialized() and torch.npu.current_device() == 0
    assert torch.npu.mem_get_info() == (npu.npu.free, npu.npu.total)
    assert torch.npu.memory_reserved(0) == npu.npu.reserved and torch.npu.memory_allocated() == npu.npu.allocated
    assert torch.npu.max_memory_allocated() == npu.npu.peak
    assert torch.npu.get_device_name(0) == "Ascend910B3 (stand-in)"
    with pytest.raises(AssertionError, match="Invalid device id"):
        torch.npu.get_device_name(1)
    npu.npu.count = 2
    torch.npu.set_device("npu:1")
    assert torch.npu.current_device() == 1 and torch.npu.Stream().device == torch.device("npu", 1)
    torch.npu.set_device(0)
    # torch_npu/npu/streams.py: Stream(device=None, priority=0, **kwargs)
    assert str(inspect.signature(torch.npu.Stream)) == "(device=None, priority=0, **kwargs)"
    stream = torch.npu.Stream()
    assert stream.device == torch.device("npu", 0) and stream.query()
    with torch.npu.stream(stream):
        torch.npu.current_stream().synchronize()
    assert npu.npu.called("stream") == [((stream,), {})] and npu.npu.called("Stream.synchronize")
    # diffusers reaches the device module through torch.get_device_module, and builds offload streams from it
    assert torch.get_device_module("npu") is npu.npu and hasattr(torch.get_device_module("npu"), "Stream")
    torch.manual_seed(3)  # seeds the PrivateUse1 device's module too
    assert npu.npu.called("manual_seed_all") == [((3,), {})]


def test_torch_npu_hf32_switches(npu: StandIn):
    """torch_npu defaults: HF32 on for convolutions, off for matmuls; allow_hf32 takes a bool only."""
    assert torch.npu.conv.allow_hf32 is True and torch.npu.matmul.allow_hf32 is False
    torch.npu.matmul.allow_hf32 = True
    torch.npu.conv.allow_hf32 = False
    assert torch.npu.matmul.allow_hf32 is True and torch.npu.conv.allow_hf32 is False
    assert npu.npu.options == {"ALLOW_MATMUL_HF32": "enable", "ALLOW_CONV_HF32": "disable"}
    with pytest.raises(TypeError, match="allow_hf32 must be a bool"):
        torch.npu.matmul.allow_hf32 = 1
    assert torch.npu.matmul.anything_else is None  # as torch_npu's __getattr__ answers


def test_torch_npu_config_is_write_only(npu: StandIn):
    torch.npu.config.allow_internal_format = False
    assert npu.npu.options == {"ALLOW_INTERNAL_FORMAT": "disable"}
    with pytest.raises(AttributeError, match="allow_internal_format"):
        torch.npu.config.allow_internal_format  # noqa: B018 - reading is what fails
    torch.npu.config.something_else = 1  # ignored, not stored
    with pytest.raises(AttributeError):
        torch.npu.config.something_else  # noqa: B018


def test_torch_npu_set_compile_mode(npu: StandIn):
    assert str(inspect.signature(torch.npu.set_compile_mode)) == "(jit_compile=False)"
    torch.npu.set_compile_mode(True)  # positional, as torch_npu allows
    assert npu.npu.options == {"jitCompile": "enable"} and not npu.npu.called("synchronize")
    torch.npu.set_device(0)
    torch.npu.set_compile_mode(jit_compile=False)  # once initialized, it drains the device first
    assert npu.npu.options == {"jitCompile": "disable"} and npu.npu.called("synchronize") == [((None,), {})]
    assert npu.npu.called("set_compile_mode") == [((), {"jit_compile": True}), ((), {"jit_compile": False})]


# ------------------------------------------------------------------------------------------ isolation


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

        assert hasattr(torch, "npu") and torch.get_device_module("npu") is torch.npu
        uninstall()
    assert "torch_npu" not in sys.modules and not hasattr(torch, "npu")
    assert not accelerate_npu() and not transformers_npu()
    with pytest.raises(RuntimeError, match="torch.npu"):
        torch.get_device_module("npu")  # no stale module cached


# ------------------------------------------------------------------------------------------ building the backend


def test_auto_selects_npu_only_when_use_ascend_npu_is_set(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("USE_ASCEND_NPU", "1")
    assert backends.resolve_name("auto") == "npu"
    monkeypatch.setenv("USE_ASCEND_NPU", "0")
    assert backends.resolve_name("auto") != "npu"


@pytest.mark.slow
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
    assert "torch_npu" in message and "pip install torch-npu (the npu extra" in message and "CANN" in message


def test_bad_npu_layout_fails_at_build_before_torch_npu(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    with pytest.raises(ConfigError, match="backend.options.layout") as err:
        NPUBackend(BackendConfig(name="npu", options={"layout": "BHSD"}))
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

    backend.setup()
    assert npu.npu.called("set_device") == [((backend.device,), {})]
    # What reached torch_npu's option store: plain ND formats, precompiled kernels (no online JIT).
    assert npu.npu.options["ALLOW_INTERNAL_FORMAT"] == "disable" and npu.npu.options["jitCompile"] == "disable"
    assert npu.npu.called("set_compile_mode") == [((), {"jit_compile": False})]

    backend.synchronize()
    backend.reset_peak_memory()
    assert backend.peak_memory() == npu.npu.peak
    backend.empty_cache()
    # set_compile_mode after set_device drains the (initialized) device first, with no argument
    assert npu.npu.called("synchronize") == [((None,), {}), ((backend.device,), {})]
    for name in ("reset_peak_memory_stats", "max_memory_allocated"):
        assert npu.npu.called(name) == [((backend.device,), {})]
    assert npu.npu.called("empty_cache") == [((), {})]
    # free device memory plus what the caching allocator holds (reusable by this process)
    assert backend.free_memory() == npu.npu.free + npu.npu.reserved
    assert npu.npu.called("mem_get_info") == npu.npu.called("memory_reserved") == [((backend.device,), {})]

    info = backend.describe()
    assert info["backend"] == "npu" and info["device"] == "npu:0"
    assert info["name"] == "Ascend910B3 (stand-in)" and "torch_npu" in info


@pytest.mark.parametrize("allow_tf32", [True, False])
def test_setup_sets_hf32_from_allow_tf32(npu: StandIn, allow_tf32: bool):
    """backend.allow_tf32 is "faster fp32 matmuls"; on the NPU that is torch.npu.matmul/conv.allow_hf32."""
    backend = NPUBackend(BackendConfig(name="npu", allow_tf32=allow_tf32))
    backend.setup()
    assert torch.npu.matmul.allow_hf32 is allow_tf32 and torch.npu.conv.allow_hf32 is allow_tf32


def test_npu_backend_supports_offload_streams(npu: StandIn):
    assert hasattr(torch.npu, "Stream")
    assert NPUBackend(BackendConfig(name="npu")).supports_offload_streams is True


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
        assert "torchao_int8" in str(err.value)
    backend.check_memory(MemoryConfig(quantization="torchao_int8"))


def test_fp8_only_on_an_ascend_950(npu: StandIn):
    """float8_e4m3fn storage is documented as unsupported on Atlas A2/A3 (Ascend 950 only)."""
    backend = NPUBackend(BackendConfig(name="npu"))
    assert "fp8" not in backend.quantization_methods()
    with pytest.raises(ConfigError) as err:
        backend.check_memory(MemoryConfig(quantization="fp8"))
    assert str(err.value).startswith("memory.quantization='fp8' is not valid: not available on Ascend910B3")
    assert "torchao_int8" in str(err.value) and "Ascend 950" in str(err.value)
    torch.npu.name = "Ascend950PR (stand-in)"
    assert "fp8" in backend.quantization_methods()
    backend.check_memory(MemoryConfig(quantization="fp8"))
    assert "fp8" not in NPUBackend.capabilities().quantization_methods()  # a dry run for an unknown Ascend


# ------------------------------------------------------------------------------------------ kernels


@pytest.mark.parametrize(
    "attention, layout", [("npu_fusion", "BNSD"), ("npu_fusion", "BSND"), ("npu_fused_infer", "BNSD")]
)
def test_backend_kernels_equal_sdpa_in_bf16(npu_cpu: StandIn, attention: str, layout: str):
    kernel = NPUBackend(BackendConfig(name="npu", attention=attention, options={"layout": layout})).attention_kernel()
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

    [(op, call)] = npu_cpu.calls
    assert call["scale"] == pytest.approx(1 / math.sqrt(d), rel=1e-12)
    assert call["dtype"] == torch.bfloat16 and call["atten_mask"] is False
    if attention == "npu_fusion":
        assert op == FUSION and call["head_num"] == n and call["input_layout"] == layout
        assert call["shape"] == ((b, s, n, d) if layout == "BSND" else (b, n, s, d))
        assert call["keep_prob"] == 1.0 and call["pre_tockens"] == call["next_tockens"] == 2147483647
    else:
        assert op == FUSED_INFER and call["num_heads"] == n and call["input_layout"] == "BNSD"


@pytest.mark.parametrize("attention", ["npu_fusion", "npu_fused_infer"])
def test_fp32_goes_to_sdpa(npu_cpu: StandIn, attention: str):
    """The backend's choice: fp32 runs SDPA. npu_fusion_attention would take it (CANN >= 8.0), the fused-infer
    op would not."""
    kernel = NPUBackend(BackendConfig(name="npu", attention=attention)).attention_kernel()
    q, k, v = _qkv(1, 2, 16, 16)
    assert torch.equal(kernel(q, k, v), sdpa(q, k, v))
    assert npu_cpu.calls == []


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
def test_contentv_transformer_npu_kernel_equals_sdpa(npu_cpu: StandIn, attention: str):
    backend = NPUBackend(BackendConfig(name="npu", attention=attention))
    # fp32: routed to SDPA, so exactly equal
    model = _tiny_transformer(torch.float32)
    assert torch.equal(
        _run_transformer(model, backend.attention_kernel(), torch.float32), _run_transformer(model, sdpa, torch.float32)
    )
    assert npu_cpu.calls == []
    # bf16 through the strict stand-in: equal within bf16 rounding
    model = _tiny_transformer(torch.bfloat16)
    out = _run_transformer(model, backend.attention_kernel(), torch.bfloat16).float()
    ref = _run_transformer(model, sdpa, torch.bfloat16).float()
    assert len(npu_cpu.calls) == 2  # one joint attention per block
    assert (out - ref).abs().max() <= 0.02 * ref.abs().max()
    assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999


# ------------------------------------------------------------------------------------------ placement

MEMORY = {
    "device": MemoryConfig(),
    "model_cpu_offload": MemoryConfig(name="model", model_cpu_offload=True, text_encoders="auto"),
    "sequential_cpu_offload": MemoryConfig(name="sequential", sequential_cpu_offload=True, text_encoders="auto"),
    "group_offload": MemoryConfig(name="group", group_offload=True, group_offload_stream=True),
    "group_offload_all": MemoryConfig(name="group", group_offload=True, text_encoders="offload"),
}
PRESETS = list(MEMORY)
ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@pytest.fixture
def npu_device(npu: StandIn):
    """The stand-in with real tensors on torch.device("npu", 0): the virtual device (tests/virtual_device.py)
    presenting PrivateUse1, which the stand-in names "npu" as torch_npu does. In-process, because a device guard
    registered from Python is all a CPU build lacks for PrivateUse1 tensors (no subprocess, no C++).
    torch.npu stays the stand-in's; host memory can be pinned, as with torch_npu; the stand-in's ops take the
    device's tensors (`is_on_device` = `vd.holds`) and still reject CPU ones."""
    with VirtualDevice(device_type="npu", register_module=False, pinned_memory=True) as vd:
        npu.is_on_device = vd.holds
        yield npu, vd


def test_the_virtual_npu_device(npu_device):
    """What the placement tests rest on: npu tensors in-process, forwards under grad mode with weights that require
    grad (without PrivateUse1's device guard, autograd aborts the process there), pinned host memory, torch.npu
    streams that torch's own stream arguments take, and the stand-in's ops taking npu tensors, refusing CPU ones."""
    import torch_npu

    npu, vd = npu_device
    npu0 = torch.device("npu", 0)
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    expected = layer(x)
    layer.to(npu0)
    assert layer.weight.device == npu0 and layer.weight.requires_grad
    out = layer(x.to(npu0))
    assert out.device == npu0 and out.requires_grad and torch.equal(out.cpu(), expected)
    with pytest.raises(RuntimeError, match="same device"):
        layer(x)

    pinned = x.pin_memory()
    assert pinned.is_pinned() and not x.is_pinned() and pinned.pin_memory() is pinned and torch.equal(pinned, x)
    stream = torch.npu.Stream()
    assert isinstance(stream, torch.Stream) and stream.device == npu0
    out.record_stream(stream)  # diffusers' group offloading with record_stream=True

    q, k, v = (t.to(npu0) for t in _qkv(1, 2, 8, 16, torch.bfloat16))
    result = torch_npu.npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.25)[0]
    assert result.device == npu0 and vd.holds(result) and len(npu.calls) == 1
    _bf16_close(result.cpu(), _sdpa(*(t.cpu() for t in (q, k, v)), scale=0.25))
    with pytest.raises(NotImplementedError, match="Could not run 'npu::npu_fusion_attention' .*'CPU' backend"):
        torch_npu.npu_fusion_attention(q.cpu(), k.cpu(), v.cpu(), 2, "BNSD", scale=0.25)


def _groups(module: torch.nn.Module) -> list:
    """diffusers' group-offloading groups hooked anywhere in module (block groups and the top-level rest)."""
    groups = []
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        hook = registry.get_hook("group_offloading") if registry is not None else None
        if hook is not None:
            groups.append(hook.group)
    return groups


@pytest.mark.parametrize("preset", PRESETS)
def test_prepare_places_the_pipeline_on_the_npu(npu_device, tiny_pipe, preset: str):
    """Real placement on the stand-in's device: where each component's weights end up after prepare(), and the
    device the offload hooks onload to."""
    from contentv.models.contentv import SPEC

    npu0 = torch.device("npu", 0)
    applied = NPUBackend(BackendConfig(name="npu")).prepare(tiny_pipe, MEMORY[preset], SPEC)
    assert applied["attention_kernel"] == "npu_fusion" and tiny_pipe.execution_device == npu0
    assert {p.kernel.__name__ for p in tiny_pipe.transformer.attn_processors.values()} == {"npu_fusion"}
    assert "cuda" not in repr(applied)

    def devices(name: str) -> set[torch.device]:
        return {p.device for p in getattr(tiny_pipe, name).parameters()}

    def hook_devices(name: str) -> set[torch.device]:  # accelerate's hooks (model and sequential offload)
        module = getattr(tiny_pipe, name)
        return {m._hf_hook.execution_device for m in module.modules() if hasattr(m, "_hf_hook")}

    if preset == "device":
        for name in ("transformer", "vae", *ENCODERS):
            assert devices(name) == {npu0}, name
    elif preset == "model_cpu_offload":  # on the CPU until their turn; hooks onload them to npu:0
        assert devices("transformer") == {torch.device("cpu")} and tiny_pipe._offload_device == npu0
        for name in ("transformer", "vae", *ENCODERS):
            assert hook_devices(name) == {npu0}, name
    elif preset == "sequential_cpu_offload":  # weights stay in CPU memory; hooks bring each layer's up
        assert devices("transformer") == {torch.device("meta")} and hook_devices("transformer") == {npu0}
    else:
        assert devices("transformer") == {torch.device("cpu")} and devices("vae") == {npu0}
        assert "stream True" in applied["placement"]
        offloaded = ("transformer", *ENCODERS) if preset == "group_offload_all" else ("transformer",)
        for name in ("transformer", *ENCODERS):
            groups = _groups(getattr(tiny_pipe, name))
            assert bool(groups) == (name in offloaded), name
            assert {(g.onload_device, g.offload_device) for g in groups} <= {(npu0, torch.device("cpu"))}, name
        streamed = [g for g in _groups(tiny_pipe.transformer) if g.stream is not None]
        assert streamed and {g.stream.device for g in streamed} == {
            npu0
        }  # torch.npu.Stream: prefetched on a side stream
        assert all(t.is_pinned() for g in streamed for t in g.cpu_param_dict.values())  # copied from pinned memory


def _run_config(backend: str, memory: MemoryConfig, dtype: str = "float32") -> RunConfig:
    cfg = RunConfig(backend=BackendConfig(name=backend), memory=memory)
    cfg.model = ModelConfig(name="tiny_contentv", family="contentv", path=None, tiny=True, dtype=dtype)
    s = cfg.sampling
    s.prompt, s.height, s.width, s.num_frames, s.num_inference_steps = "a red fox walks in snow", 32, 48, 5, 1
    return cfg


def _generate_on_the_npu(backend: NPUBackend, cfg: RunConfig):
    """One video by the runtime on the virtual npu -> (frames, the devices of the transformer's tensor inputs)."""
    runtime = Runtime(backend, progress=False)
    pipe = runtime.pipeline(cfg)  # loads, then backend.prepare places it
    inputs: set[torch.device] = set()

    def record(_module, args, kwargs):
        inputs.update(t.device for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))

    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        frames = runtime.generate(cfg).frames
    finally:
        handle.remove()
        runtime.release()
    return frames, inputs


@pytest.mark.parametrize("preset", PRESETS)
def test_generates_on_the_npu(npu_device, cpu_frames, preset: str):
    """A whole video (one step, fp32) on the virtual npu under each placement. The device raises on any op that
    mixes devices, so finishing proves there was none; the transformer ran on npu tensors, and the frames equal
    the CPU run's (fp32 goes to SDPA, on the same CPU kernels)."""
    npu, vd = npu_device
    npu0 = torch.device("npu", 0)
    frames, inputs = _generate_on_the_npu(NPUBackend(BackendConfig(name="npu")), _run_config("npu", MEMORY[preset]))
    expected = cpu_frames(_run_config("cpu", MemoryConfig(), "float32"))
    assert inputs == {npu0}
    assert vd.log.h2d_count > 0 and npu.calls == []  # fp32: no fused kernel
    assert frames.shape == expected.shape and float(abs(frames - expected).max()) <= 1e-5


@pytest.mark.parametrize(
    "attention, layout, preset",
    [
        ("npu_fusion", "BNSD", "device"),
        ("npu_fusion", "BSND", "model_cpu_offload"),
        ("npu_fused_infer", "BNSD", "group_offload"),
    ],
)
def test_fused_attention_runs_on_the_npu(npu_device, cpu_frames, attention: str, layout: str, preset: str):
    """bf16: the fused kernels get the virtual npu's tensors through the stand-in's own device check (no CPU
    tensors standing in); frames within bf16 rounding of the CPU run with SDPA (measured max 0.027)."""
    npu, _ = npu_device
    npu0 = torch.device("npu", 0)
    backend = NPUBackend(BackendConfig(name="npu", attention=attention, options={"layout": layout}))
    frames, inputs = _generate_on_the_npu(backend, _run_config("npu", MEMORY[preset], "bfloat16"))
    expected = cpu_frames(_run_config("cpu", MemoryConfig(), "bfloat16"))
    op = FUSION if attention == "npu_fusion" else FUSED_INFER
    assert inputs == {npu0} and npu.calls and {name for name, _ in npu.calls} == {op}
    assert frames.shape == expected.shape and float(abs(frames - expected).max()) <= 0.05


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
        backend = NPUBackend(BackendConfig(name="npu", attention=attention, options={"layout": layout}))
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
