"""The memory planner: exact weight bytes, activation estimates, strategy choice, the printed plan.

Weight predictions are compared with checkpoints actually loaded (and quantized by backends/memory.py);
activation estimates with meta-device traces of the real modules (and, with a GPU, with measured peaks).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import time
from pathlib import Path

import psutil
import pytest
import torch

import demo
from backends.base import Capabilities
from contentv import memory_policy, planner
from contentv.config import MemoryConfig, ModelConfig, RunConfig
from contentv.errors import ConfigError
from contentv.models.contentv import architecture
from contentv.planner.activations import LiveBytes, _vae_trace, activation_bytes, decode_bytes
from contentv.planner.weights import _unique
from contentv.registry import get_spec

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GiB = 2**30

# A fixed preset set, so choices don't depend on which presets conf/memory holds today.
PRESETS = {
    "none": MemoryConfig(name="none"),
    "low_vram_24g": MemoryConfig(name="low_vram_24g", model_cpu_offload=True),
    "low_vram_16g": MemoryConfig(name="low_vram_16g", group_offload=True, group_offload_stream=True),
    "low_vram_8g": MemoryConfig(
        name="low_vram_8g",
        group_offload=True,
        group_offload_stream=True,
        text_encoders="offload",
        vae_tiling=True,
        guidance_mode="sequential",
    ),
    "int8_offload": MemoryConfig(name="int8_offload", model_cpu_offload=True, quantization="torchao_int8"),
    "sequential": MemoryConfig(name="sequential", sequential_cpu_offload=True),
}
# A GPU-like device: offload streams, every quantization, batched guidance.
GPU = Capabilities("gpu", True, True, memory_policy.QUANTIZATIONS)
MODELS = demo.load_presets(("model",)).models


def model_config(name: str, **overrides) -> ModelConfig:
    """conf/model/<name>.yaml as a ModelConfig (as Hydra composes it)."""
    return dataclasses.replace(MODELS[name], **overrides)


def loaded_bytes(module: torch.nn.Module) -> int:
    """Bytes a loaded (maybe quantized) component holds: parameters and buffers, with tensor subclasses'
    inner tensors and bitsandbytes' 4-bit quantization state, each tensor once."""
    total = 0
    for t in _unique([*module.parameters(), *module.buffers()]):
        inner = t.data if isinstance(t, torch.nn.Parameter) else t
        if type(inner) is not torch.Tensor and hasattr(inner, "__tensor_flatten__"):  # torchao
            names, _ = inner.__tensor_flatten__()
            total += sum(getattr(inner, n).nbytes for n in names)
        else:
            total += t.nbytes
        state = getattr(t, "quant_state", None)  # bitsandbytes nf4: travels with the layer
        if state is not None:
            total += state.absmax.nbytes + state.code.nbytes + (state.offset.nbytes if state.offset is not None else 0)
            if state.state2 is not None:
                total += state.state2.absmax.nbytes + state.state2.code.nbytes
    return total


def has_tiny(name: str) -> bool:
    return (CONF / "model" / f"{name}.yaml").is_file()


TINY = [
    ("tiny_contentv", "float32"),
    ("tiny_contentv", "bfloat16"),
    ("tiny_contentv", "float16"),  # T5 keeps `wo` in float32 under fp16
    pytest.param(
        "tiny_cogvideox",
        "float32",
        marks=pytest.mark.skipif(not has_tiny("tiny_cogvideox"), reason="no tiny CogVideoX"),
    ),
    pytest.param(
        "tiny_cogvideox",
        "bfloat16",
        marks=pytest.mark.skipif(not has_tiny("tiny_cogvideox"), reason="no tiny CogVideoX"),
    ),
]


# ------------------------------------------------------------------------------------------ weights


def test_full_size_transformer_config_is_the_class_defaults():
    from contentv.models.contentv.transformer import SD3Transformer3DModel

    defaults = {
        k: (list(p.default) if isinstance(p.default, tuple) else p.default)
        for k, p in inspect.signature(SD3Transformer3DModel.__init__).parameters.items()
        if k != "self"
    }
    assert architecture.TRANSFORMER == defaults


def test_full_size_vae_config_is_autoencoderklwan_defaults():
    from diffusers import AutoencoderKLWan

    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    assert {k: params[k].default for k in architecture.WAN_VAE} == architecture.WAN_VAE


@pytest.mark.parametrize("name,dtype", TINY)
def test_predicted_weight_bytes_equal_loaded_bytes(cache_dir, name, dtype):
    cfg = model_config(name, dtype=dtype)
    spec = get_spec(cfg.family)
    path = spec.resolve_path(cfg)
    components = spec.components_on_meta(cfg, path)
    assert all(p.device.type == "meta" for m, _ in components.values() for p in m.parameters())
    pipe = spec.load(cfg, path)
    loaded = {n: loaded_bytes(getattr(pipe, n)) for n in components}
    predicted = {n: planner.weight_bytes(m, d) for n, (m, d) in components.items()}
    assert predicted == loaded
    assert set(components) == {n for n, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


QUANTIZATIONS = [
    pytest.param(
        "bnb_int8", marks=pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="no bitsandbytes")
    ),
    pytest.param(
        "bnb_nf4", marks=pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="no bitsandbytes")
    ),
    "fp8",
    pytest.param(
        "torchao_int8", marks=pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="no torchao")
    ),
]


@pytest.mark.parametrize("method", QUANTIZATIONS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_predicted_quantized_bytes_equal_backends_quantization(cache_dir, method, dtype):
    """The planner counts the same layers as quantized as backends/memory.py quantizes, at the same bytes."""
    from backends import memory as mem
    from backends.cpu import CPUBackend
    from contentv.config import BackendConfig

    cfg = model_config("tiny_contentv", dtype=dtype)
    spec = get_spec("contentv")
    path = spec.resolve_path(cfg)
    components = architecture.components_on_meta(cfg, path)
    memory = MemoryConfig(quantization=method, quantize=["transformer", "text_encoder_3"])
    pipe = spec.load(cfg, path)
    mem.quantize(pipe, memory, CPUBackend(BackendConfig(name="cpu")))
    for name in ("transformer", "text_encoder_3"):
        module, load_dtype = components[name]
        assert planner.weight_bytes(module, load_dtype, method) == loaded_bytes(getattr(pipe, name)), name
        assert planner.weight_bytes(module, load_dtype, method) < planner.weight_bytes(module, load_dtype)


def test_full_size_contentv_weights_from_builtin_configs():
    cfg = ModelConfig()  # ContentV-8B, bf16 transformer and text encoders, fp32 VAE
    components = architecture.components_on_meta(cfg, architecture.HUB_ID)
    params = {n: sum(p.numel() for p in m.parameters()) for n, (m, _) in components.items()}
    assert 8.0e9 <= params["transformer"] <= 8.1e9
    assert planner.weight_bytes(*components["transformer"]) == 2 * params["transformer"]
    assert params["text_encoder_3"] == pytest.approx(4.76e9, rel=0.005)
    assert params["text_encoder"] == pytest.approx(0.124e9, rel=0.01)
    assert params["text_encoder_2"] == pytest.approx(0.695e9, rel=0.01)
    assert params["vae"] == pytest.approx(0.127e9, rel=0.01)
    assert planner.weight_bytes(*components["vae"]) == 4 * params["vae"]  # float32, no buffers
    # Quantized: int8 ~ 1 byte per quantized weight (+ row scales), nf4 ~ 0.5. fp8 keeps every layer whose
    # name matches the regex "norm" in bf16, AdaLayerNormZero's modulation Linears (norm1.linear, a third
    # of the weights) included; int8 matches whole name parts ("norm1" != "norm") and quantizes them.
    t, dtype = components["transformer"]
    for method, low, high in (
        ("bnb_int8", 0.5, 0.52),
        ("torchao_int8", 0.5, 0.52),
        ("fp8", 0.6, 0.7),
        ("bnb_nf4", 0.26, 0.29),
    ):
        ratio = planner.weight_bytes(t, dtype, method) / planner.weight_bytes(t, dtype)
        assert low < ratio < high, (method, ratio)


# ------------------------------------------------------------------------------------------ activations


def test_activation_estimate_is_linear_in_batch_and_tokens():
    kw = dict(video_tokens=20_000, text_tokens=333, dim=2432, ff_dim=4 * 2432, dtype=torch.bfloat16, heads=38)
    one = activation_bytes(batch=1, **kw)
    assert activation_bytes(batch=2, **kw) == pytest.approx(2 * one, rel=1e-6)
    double = dict(kw, video_tokens=2 * 20_333 - 333)
    assert activation_bytes(batch=1, **double) == pytest.approx(2 * one, rel=1e-6)
    assert activation_bytes(batch=1, **dict(kw, dtype=torch.float32)) == pytest.approx(2 * one, rel=1e-6)
    # 12 (B, N, d) tensors at the feed-forward peak with a 4x FF.
    assert one == pytest.approx(12 * 20_333 * 2432 * 2, rel=1e-6)
    # The math kernel's N^2 scores dominate; query slicing divides them.
    math_full = activation_bytes(batch=1, **kw, math_attention=True)
    math_sliced = activation_bytes(batch=1, **kw, math_attention=True, attention_chunk=1024)
    assert math_full > 10 * one and math_sliced < math_full / 10


def _patch_sincos(monkeypatch):
    # ContentV's 3-D positions are computed with numpy on the CPU; give the meta run a meta tensor.
    import contentv.models.contentv.transformer as tm

    monkeypatch.setattr(tm, "_sincos_3d", lambda d, t, h, w: torch.empty(1, t * h * w, d, device="meta"))


@pytest.mark.parametrize("batch", [1, 2])
def test_transformer_activation_model_matches_a_meta_trace_of_contentv(monkeypatch, batch):
    """Full-width ContentV blocks (3 of 38) at 49 frames 432x768: the estimate is the traced peak within 2 %."""
    from contentv.models.contentv.attention import ContentVJointAttnProcessor
    from contentv.models.contentv.transformer import SD3Transformer3DModel

    _patch_sincos(monkeypatch)
    with torch.device("meta"):
        model = SD3Transformer3DModel(num_layers=3)
    model = torch.nn.Module.to(model, torch.bfloat16)
    model.set_attn_processor(ContentVJointAttnProcessor(lambda q, k, v: torch.empty_like(q)))  # flash-like: O(N)
    t, h, w = 13, 54, 96
    x = torch.empty(batch, 16, t, h, w, device="meta", dtype=torch.bfloat16)
    text = torch.empty(batch, 333, 4096, device="meta", dtype=torch.bfloat16)
    pooled = torch.empty(batch, 2048, device="meta", dtype=torch.bfloat16)
    step = torch.empty(batch, device="meta", dtype=torch.bfloat16)
    model.prepare_positions(x.shape, torch.device("meta"), torch.bfloat16)  # made before the loop, as the pipeline does
    with LiveBytes() as live, torch.no_grad():
        model(x, text, pooled, step, return_dict=False)
    predicted = activation_bytes(
        batch=batch,
        video_tokens=t * (h // 2) * (w // 2),
        text_tokens=333,
        dim=2432,
        ff_dim=4 * 2432,
        dtype=torch.bfloat16,
        heads=38,
        live=architecture.BLOCK_LIVE,
    )
    assert predicted == pytest.approx(live.peak, rel=0.02)


def test_transformer_activation_model_matches_a_meta_trace_of_cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    from contentv.models.cogvideox.attention import CogVideoXKernelAttnProcessor

    with torch.device("meta"):
        model = CogVideoXTransformer3DModel(num_layers=2)  # 2B width
    model = torch.nn.Module.to(model, torch.float16)
    model.set_attn_processor(CogVideoXKernelAttnProcessor(lambda q, k, v: torch.empty_like(q)))
    x = torch.empty(2, 13, 16, 60, 90, device="meta", dtype=torch.float16)
    text = torch.empty(2, 226, 4096, device="meta", dtype=torch.float16)
    with LiveBytes() as live, torch.no_grad():
        model(x, text, torch.empty(2, device="meta"), return_dict=False)
    predicted = activation_bytes(
        batch=2, video_tokens=13 * 30 * 45, text_tokens=226, dim=1920, ff_dim=4 * 1920, dtype=torch.float16, heads=30
    )
    assert predicted == pytest.approx(live.peak, rel=0.02)


def test_live_bytes_counts_what_is_alive():
    x = torch.empty(1024, device="meta")
    with LiveBytes() as live:
        y = x * 2  # 4 KiB
        z = y + 1  # 8 KiB alive
        del y
        w = z.view(32, 32)  # a view: no new storage
        del z, w
        _ = torch.empty(256, device="meta")  # 1 KiB
    assert live.peak == 8192
    assert live.current == 1024


def test_decode_estimate_matches_a_meta_trace_of_the_full_size_wan_vae():
    """The decode peak traced at a small size and extrapolated equals a direct trace at a larger one (5 %)."""
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        vae = AutoencoderKLWan(**architecture.WAN_VAE)
    latent = (16, 6, 18, 24)  # 21 frames at 144x192
    traced = _vae_trace(vae, torch.float32, latent)
    video = 3 * 21 * 144 * 192 * 4
    estimate, tiled = decode_bytes(vae, torch.float32, latent, architecture.DECODE_TRACE_FRAMES)
    assert estimate == pytest.approx(max(traced, 3 * video), rel=0.05)
    assert tiled == estimate  # 144x192 is smaller than one 256x256 tile


# ------------------------------------------------------------------------------------------ plans


def full_size_run(**sampling) -> RunConfig:
    cfg = RunConfig()  # ContentV-8B, 432x768, 125 frames, bf16; nothing local: the built-in configs
    cfg.sampling = dataclasses.replace(cfg.sampling, **sampling)
    return cfg


def test_full_size_plan_builds_on_the_cpu_without_loading_weights():
    planner.plan(full_size_run(num_frames=9), PRESETS, GPU)  # imports and first meta kernels
    rss = psutil.Process().memory_info().rss
    start = time.perf_counter()
    p = planner.plan(full_size_run(), PRESETS, GPU)
    seconds = time.perf_counter() - start
    assert psutil.Process().memory_info().rss - rss < 1 * GiB  # 27 GB of weights were never materialized
    assert seconds < 30  # seconds in practice; generous: shared machines are noisy
    assert {s.name for s in p.strategies} == set(PRESETS)
    assert p.chosen is None  # no budget: the table only
    assert p.weights["transformer"] == 2 * sum(
        x.numel() for x in architecture.components_on_meta(ModelConfig(), None)["transformer"][0].parameters()
    )
    none = next(s for s in p.strategies if s.name == "none")
    assert none.time == 1.0 and none.device_bytes > sum(p.weights.values())
    # Every stage and both host figures are predicted; offloading trades device memory for host RAM.
    offload = next(s for s in p.strategies if s.name == "low_vram_24g")
    assert set(offload.stage_bytes) == set(planner.STAGES)
    assert offload.device_bytes < none.device_bytes and offload.host_bytes > none.host_bytes


def test_budget_picks_the_fastest_strategy_that_fits():
    """Whatever the time anchors: the choice fits, every faster strategy doesn't, and more memory never
    buys a slower choice."""
    chosen = []
    for budget_gb in (5, 8, 16, 24, 80):
        p = planner.plan(full_size_run(), PRESETS, GPU, budget_bytes=budget_gb * GiB)
        assert p.chosen.device_bytes <= 0.95 * budget_gb * GiB
        faster = [s for s in p.strategies if s.time < p.chosen.time and not s.error]
        assert all(s.device_bytes > 0.95 * budget_gb * GiB for s in faster)
        chosen.append(p.chosen)
    assert [c.time for c in chosen] == sorted((c.time for c in chosen), reverse=True)
    assert chosen[-1].name == "none"  # 80 GiB holds everything (32 GiB predicted)


def test_host_budget_rules_out_strategies_the_host_cannot_hold():
    """memory=auto checks host RAM too: group offload pins a host copy of every block."""
    roomy = planner.plan(full_size_run(), PRESETS, GPU, budget_bytes=16 * GiB)
    tight = planner.plan(full_size_run(), PRESETS, GPU, budget_bytes=16 * GiB, host_budget_bytes=32 * GiB)
    assert tight.chosen.host_peak_bytes <= 32 * GiB
    assert all(s.host_peak_bytes > 32 * GiB or s.device_bytes > 0.95 * 16 * GiB for s in tight.strategies if not s.fits)
    if roomy.chosen.host_peak_bytes > 32 * GiB:  # the device-only choice would not have fitted this host
        assert tight.chosen.name != roomy.chosen.name
    with pytest.raises(ConfigError, match=r"host RAM: 4\.0 GiB available, the least any strategy needs is"):
        planner.plan(full_size_run(), PRESETS, GPU, budget_bytes=16 * GiB, host_budget_bytes=4 * GiB)


def test_memory_budget_gb_wins_over_the_device_figure():
    cfg = full_size_run()
    cfg.memory = MemoryConfig(name="auto", budget_gb=80)
    assert planner.plan(cfg, PRESETS, GPU, budget_bytes=1 * GiB).chosen.name == "none"


def test_nothing_fits_names_memory_budget_gb():
    with pytest.raises(ConfigError, match=r"memory\.budget_gb=.*smallest predicted peak is [0-9.]+ GiB"):
        planner.plan(full_size_run(), PRESETS, GPU, budget_bytes=2 * GiB)


def test_plan_with_this_repo_s_presets():
    """Whatever conf/memory holds: every preset gets a row, the choice is the fastest that fits, and the
    low-VRAM presets meet the project's peak targets for their cards (as predicted)."""
    presets = demo.load_presets(("memory",)).memories
    for budget in (80, 24, 16, 8):
        try:
            p = planner.plan(full_size_run(), presets, GPU, budget_bytes=budget * GiB)
        except ConfigError as exc:
            assert exc.option == "memory.budget_gb"
            continue
        assert {s.name for s in p.strategies} == set(presets) - {"auto"}
        assert p.chosen.device_bytes <= 0.95 * budget * GiB
        assert not [s for s in p.strategies if s.fits and s.time < p.chosen.time]
    p = planner.plan(full_size_run(), presets, GPU)
    assert p.strategies[0].name == "none"
    targets = {"low_vram_24g": 22, "low_vram_16g": 15, "low_vram_8g": 7.5}  # GiB, benchmarks/gpu_tables.py TARGETS
    for s in p.strategies:
        if s.name in targets:
            assert s.device_bytes <= targets[s.name] * GiB, (s.name, s.device_bytes / GiB)


def test_strategies_the_backend_cannot_run_are_shown_and_never_chosen():
    no_quantization = Capabilities("test", True, True, ("none",))
    p = planner.plan(full_size_run(), PRESETS, no_quantization, budget_bytes=80 * GiB)
    int8 = next(s for s in p.strategies if s.name == "int8_offload")
    assert int8.error and not int8.fits
    assert "unavailable: memory.quantization" in planner.format_plan(p)


def test_sequential_guidance_and_tiling_lower_the_peak():
    p = planner.plan(full_size_run(), PRESETS, GPU)
    assert p.activations["denoising_sequential"] < 0.55 * p.activations["denoising_batched"]
    assert p.activations["decoding_tiled"] < 0.5 * p.activations["decoding"]
    # Offloaded blocks are prefetched: streams make group offload faster, not larger than 2 blocks.
    slow = planner.plan(full_size_run(), PRESETS, Capabilities("no-streams", False, True, memory_policy.QUANTIZATIONS))
    by_name = {s.name: s for s in slow.strategies}
    fast = {s.name: s for s in p.strategies}
    assert by_name["low_vram_16g"].time > fast["low_vram_16g"].time
    assert by_name["low_vram_16g"].stage_bytes["denoising"] < fast["low_vram_16g"].stage_bytes["denoising"]


def test_configured_preset_with_overrides_gets_its_own_row():
    cfg = full_size_run()
    cfg.memory = MemoryConfig(name="low_vram_24g", model_cpu_offload=True, vae_tiling=True)
    names = [s.name for s in planner.plan(cfg, PRESETS, GPU).strategies]
    assert "low_vram_24g (as configured)" in names and "low_vram_24g" in names


def test_format_plan_is_a_readable_table():
    p = planner.plan(full_size_run(), PRESETS, GPU, budget_bytes=24 * GiB)
    text = planner.format_plan(p)
    assert "432x768, 125 frames" in text and "fits 24.0 GiB" in text
    for s in p.strategies:
        assert s.name in text
    assert f"chosen: {p.chosen.name}" in text and "<- chosen" in text


def test_tiny_plans_build(cache_dir):
    for name in ("tiny_contentv", "tiny_cogvideox"):
        if not has_tiny(name):
            continue
        cfg = RunConfig(model=model_config(name))
        p = planner.plan(cfg, PRESETS, GPU, budget_bytes=1 * GiB)
        assert p.chosen.name == "none", name
        assert sum(p.weights.values()) < 20 * 2**20


def test_hub_id_without_local_configs_uses_the_builtin_contentv_configs():
    configs, source = architecture.component_configs("someone/not-cached-anywhere")
    assert source.startswith("built-in") and configs["transformer"] == architecture.TRANSFORMER


# ------------------------------------------------------------------------------------------ GPU check


@pytest.mark.cuda
def test_predicted_denoising_peak_matches_the_gpu_within_10_percent():
    """Two full-width ContentV blocks at 49 frames 432x768, batch 2, bf16, SDPA: measured vs predicted peak."""
    from contentv.attention import sdpa
    from contentv.models.contentv.attention import ContentVJointAttnProcessor
    from contentv.models.contentv.transformer import SD3Transformer3DModel

    device = torch.device("cuda")
    model = SD3Transformer3DModel(num_layers=2).to(device=device, dtype=torch.bfloat16).eval()
    model.set_attn_processor(ContentVJointAttnProcessor(sdpa))
    t, h, w, batch = 13, 54, 96, 2
    x = torch.randn(batch, 16, t, h, w, device=device, dtype=torch.bfloat16)
    text = torch.randn(batch, 333, 4096, device=device, dtype=torch.bfloat16)
    pooled = torch.randn(batch, 2048, device=device, dtype=torch.bfloat16)
    step = torch.full((batch,), 500.0, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        model(x, text, pooled, step, return_dict=False)  # warm-up (kernels, workspaces)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        model(x, text, pooled, step, return_dict=False)
        torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    predicted = activation_bytes(
        batch=batch,
        video_tokens=t * (h // 2) * (w // 2),
        text_tokens=333,
        dim=2432,
        ff_dim=4 * 2432,
        dtype=torch.bfloat16,
        heads=38,
        live=architecture.BLOCK_LIVE,
    )
    assert predicted == pytest.approx(measured, rel=0.10)


@pytest.mark.parametrize("batch", [1, 2])
def test_bnb_int8_matmul_temporaries_are_counted(batch):
    """bitsandbytes' int8 matmul holds per token the int8 input, an int32 accumulator, an fp16 dequantized output
    and its bf16 cast at the FF up-projection (2432 -> 9728): +3.2 GiB at 432x768x125 in batch 2 over the bf16
    peak (tests/test_bnb_temporaries.py checks the per-token bytes against a real layer)."""
    kw = dict(batch=batch, video_tokens=41_472, text_tokens=333, dim=2432, ff_dim=4 * 2432, dtype=torch.bfloat16)
    plain = activation_bytes(**kw, live=architecture.BLOCK_LIVE)
    int8 = activation_bytes(**kw, live=architecture.BLOCK_LIVE, quantization="bnb_int8")
    tokens = batch * 41_805
    assert int8 - plain == tokens * (2432 + 4 + 4 * 4 * 2432)  # dim + 4 + 8 ff - 2 * 2 ff (the bf16 FF tensors)
    if batch == 2:
        assert 3.1 * GiB < int8 - plain < 3.3 * GiB
    # and the int8 preset's denoising stage carries them: it saves less than the transformer's weights shrink
    cfg = full_size_run()
    memories = {
        "int8": MemoryConfig(name="int8", model_cpu_offload=True, quantization="bnb_int8", quantize=["transformer"]),
        "offload": MemoryConfig(name="offload", model_cpu_offload=True),
    }
    by_name = {s.name: s for s in planner.plan(cfg, memories, GPU).strategies}
    saved = by_name["offload"].stage_bytes["denoising"] - by_name["int8"].stage_bytes["denoising"]
    module, dtype = architecture.components_on_meta(cfg.model, None)["transformer"]
    shrunk = planner.weight_bytes(module, dtype) - planner.weight_bytes(module, dtype, "bnb_int8")
    assert saved == shrunk - (int8 - plain) * (41_805 * 2) // tokens  # batch 2 (batched guidance on a GPU)


def test_a_run_this_machine_cannot_hold_is_refused_before_loading(cache_dir):
    """2001 frames at 2048x2048 of the tiny model on the CPU (the decoded video alone is ~100 GB): the planner's
    host-RAM need against what this machine has, one line naming the numbers and the override;
    memory.check_fit=false lets those who know better try."""
    from backends import build_backend
    from contentv.config import BackendConfig
    from contentv.validation import validate_run

    cfg = RunConfig(model=model_config("tiny_contentv"), backend=BackendConfig(name="cpu"))
    cfg.sampling.prompt, cfg.sampling.num_frames = "a cat", 2001
    cfg.sampling.height = cfg.sampling.width = 2048
    backend = build_backend(cfg.backend)
    with pytest.raises(ConfigError) as err:
        validate_run(cfg, backend)
    text = str(err.value)
    assert text.startswith("memory='none' is not valid: a strategy that fits: tiny_contentv at 2048x2048, 2001 frames")
    assert "GiB of host RAM, this machine has" in text and "memory.check_fit=false" in text and "\n" not in text
    cfg.memory.check_fit = False
    validate_run(cfg, backend)  # checked no further: the user asked to try
    cfg.memory.check_fit, cfg.sampling.num_frames, cfg.sampling.height, cfg.sampling.width = True, 13, 64, 96
    validate_run(cfg, backend)  # an ordinary run fits


def test_a_device_budget_the_run_exceeds_is_refused_with_the_numbers():
    cfg = full_size_run()
    cfg.memory = dataclasses.replace(PRESETS["none"], budget_gb=24)
    with pytest.raises(ConfigError, match=r"predicted to need 3\d\.\d GiB on cuda:0, which has 24\.0 GiB free"):
        planner.check_fits(cfg, GPU, None, 512 * GiB, device="cuda:0")
    cfg.memory = dataclasses.replace(PRESETS["low_vram_16g"], budget_gb=24)
    planner.check_fits(cfg, GPU, None, 512 * GiB, device="cuda:0")


# ------------------------------------------------------------------------- lossy options only when needed

# low_vram_8g's placement: the untiled decode (not the denoising) sets its peak at the reference size.
DECODE_BOUND = MemoryConfig(
    name="decode_bound", group_offload=True, group_offload_stream=True, text_encoders="offload", vae_tiling=None
)


def predicted(memory: MemoryConfig, budget_gb: float | None = None) -> planner.Strategy:
    budget = None if budget_gb is None else int(budget_gb * GiB)
    p = planner.plan(full_size_run(), {memory.name: memory}, GPU, budget_bytes=budget, choose=False)
    return next(s for s in p.strategies if s.name == memory.name)


def test_vae_tiling_null_tiles_only_where_the_untiled_decode_would_not_fit():
    """Tiling changes the frames: null turns it on only when the budget needs it, and the prediction is then
    exactly the explicit one's."""
    untiled = predicted(dataclasses.replace(DECODE_BOUND, vae_tiling=False))
    tiled = predicted(dataclasses.replace(DECODE_BOUND, vae_tiling=True))
    assert tiled.device_bytes < untiled.device_bytes  # the decode stage dominates this strategy's peak
    roomy = untiled.device_bytes / GiB / 0.95 + 0.1  # holds the untiled decode
    tight = (tiled.device_bytes + untiled.device_bytes) / 2 / GiB / 0.95  # holds only the tiled one
    for budget_gb, expected, tiling in ((None, untiled, False), (roomy, untiled, False), (tight, tiled, True)):
        s = predicted(DECODE_BOUND, budget_gb)
        assert s.vae_tiling is tiling, budget_gb
        assert (s.device_bytes, s.stage_bytes, s.time) == (expected.device_bytes, expected.stage_bytes, expected.time)


def test_vae_tiling_null_stays_off_where_tiling_would_not_lower_the_peak():
    """Model offload peaks while denoising: tiling could not help it fit, so a small budget doesn't turn it on."""
    memory = MemoryConfig(name="offload", model_cpu_offload=True, vae_tiling=None)
    assert predicted(memory, budget_gb=8).vae_tiling is False


def test_the_plan_marks_what_changes_the_output():
    def row(budget_gb: float | None) -> str:
        p = planner.plan(
            full_size_run(),
            {"decode_bound": DECODE_BOUND},
            GPU,
            budget_bytes=budget_gb and int(budget_gb * GiB),
            choose=False,
        )
        return next(line for line in planner.format_plan(p).splitlines() if line.startswith("decode_bound"))

    tiled = predicted(dataclasses.replace(DECODE_BOUND, vae_tiling=True))
    assert " same " in row(None) and " changes " in row(tiled.device_bytes / GiB / 0.95 + 0.1)
    quantized = planner.plan(full_size_run(), PRESETS, GPU)
    text = planner.format_plan(quantized)
    assert " changes " in next(line for line in text.splitlines() if line.startswith("int8_offload"))
    assert " same " in next(line for line in text.splitlines() if line.startswith("none "))


def test_resolve_vae_tiling_decides_null_and_keeps_set_values():
    cfg = full_size_run()
    tiled = predicted(dataclasses.replace(DECODE_BOUND, vae_tiling=True))
    tight = int(tiled.device_bytes / 0.95) + GiB // 10
    for value in (True, False):
        cfg.memory = dataclasses.replace(DECODE_BOUND, vae_tiling=value)
        assert planner.resolve_vae_tiling(cfg, GPU, tight).vae_tiling is value
        assert planner.resolve_vae_tiling(cfg, GPU, None).vae_tiling is value
    cfg.memory = DECODE_BOUND
    assert planner.resolve_vae_tiling(cfg, GPU, None).vae_tiling is False
    assert planner.resolve_vae_tiling(cfg, GPU, tight).vae_tiling is True
    # memory.budget_gb wins over the device's figure, as for the choice of a preset
    cfg.memory = dataclasses.replace(DECODE_BOUND, budget_gb=80)
    assert planner.resolve_vae_tiling(cfg, GPU, tight).vae_tiling is False


def test_repo_presets_turn_lossy_options_on_only_where_their_card_needs_them():
    """The low-VRAM presets leave VAE tiling to the budget; at 80 GiB none of them changes the output."""
    presets = demo.load_presets(("memory",)).memories
    for name in ("low_vram_24g", "low_vram_16g", "low_vram_8g"):
        assert presets[name].vae_tiling is None, name
        assert predicted(presets[name], budget_gb=80).vae_tiling is False


def test_the_plan_header_names_the_guidance_this_backend_runs():
    """auto guidance is sequential where the backend prefers it (the CPU): the plan says what will run."""
    cpu_like = Capabilities("cpu-like", False, False, memory_policy.QUANTIZATIONS)
    assert planner.plan(full_size_run(), PRESETS, cpu_like).guidance == "sequential"
    assert planner.plan(full_size_run(), PRESETS, GPU).guidance == "batched"
