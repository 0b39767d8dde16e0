"""Memory strategies on the tiny ContentV model: presets compose, mechanisms are in place, outputs unchanged.

Offload, slicing and tiling must not change the result (fp32, ~1e-5 relative). Quantization must change it
a little and never be a silent no-op. Tolerances were measured on the tiny model (2 steps, 32x48x5, seeds 0
and 1): relative error bnb_int8 ~4e-3, bnb_nf4 ~2.1e-2, fp8 ~3.8e-3, torchao_int8 ~7e-4.
"""

from __future__ import annotations

import copy
import json
import logging
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import backends
import demo
from backends import memory as mem
from contentv import _diffusers, memory_policy
from contentv.attention import sdpa, sliced
from contentv.config import BackendConfig, MemoryConfig, RunConfig, SamplingConfig
from contentv.errors import ConfigError
from contentv.memory_policy import guidance_mode
from contentv.models.contentv import SPEC
from tests.virtual_device import VirtualDevice

PRESET_DIR = Path(__file__).resolve().parents[1] / "conf" / "memory"
# The presets as the command line composes them; `auto` is the planner choosing among these, not a strategy
# of its own (tests/test_planner.py covers it).
ALL_PRESETS = demo.load_presets(("memory",)).memories
PRESETS = sorted(n for n in ALL_PRESETS if n != "auto")
EXPECTED_PRESETS = {
    "none",
    "low_vram_24g",
    "low_vram_16g",
    "low_vram_8g",
    "model_offload",
    "sequential_offload",
    "int8",
}
# Relative error bounds, about 3-5x the measured error; cosine similarity must stay above 0.999 for all.
QUANT_REL = {"bnb_int8": 2e-2, "bnb_nf4": 8e-2, "fp8": 2e-2, "torchao_int8": 5e-3}
EXACT_REL = 1e-5


# ------------------------------------------------------------------------------------------ helpers


def cpu_backend():
    return backends.build_backend(BackendConfig(name="cpu"))


def load(cfg, path):
    pipe = SPEC.load(cfg, path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, guidance_mode: str = "batched", seed: int = 0) -> torch.Tensor:
    """Final latents (1, 16, 2, 4, 6) of a 2-step run; CPU generator, so the same noise everywhere."""
    out = pipe(
        prompt="a red fox in snow",
        negative_prompt="blurry",
        height=32,
        width=48,
        num_frames=5,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        guidance_mode=guidance_mode,
    )
    return out.frames.detach().float().cpu()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def load_preset(name: str) -> MemoryConfig:
    return copy.deepcopy(ALL_PRESETS[name])


def stub_backend(name="npu", streams=False, methods=("none", "fp8", "torchao_int8")):
    """Just what the memory policy reads from a backend: an NPU-like device without bitsandbytes."""
    return types.SimpleNamespace(
        name=name, device=torch.device("cpu"), supports_offload_streams=streams, quantization_methods=lambda: methods
    )


def text_encoders(pipe) -> list[nn.Module]:
    return [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]


def group_offloaded(module: nn.Module) -> bool:
    return _diffusers.is_group_offloaded(module)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def ckpt(tiny_model_cfg, tiny_ckpt):
    """(model config, path) of the tiny checkpoint, built once."""
    return tiny_model_cfg, tiny_ckpt


@pytest.fixture(scope="module")
def ref(ckpt) -> dict[str, torch.Tensor]:
    """Unoptimised final latents per guidance mode (and seed 1 for batched)."""
    pipe = load(*ckpt)
    cpu_backend().prepare(pipe, MemoryConfig(), SPEC)
    return {
        "batched": generate(pipe, "batched"),
        "sequential": generate(pipe, "sequential"),
    }


@pytest.fixture(scope="module")
def quantized(ckpt):
    """method -> (pipeline, applied, latents), each quantized pipeline built once per module."""
    cache: dict = {}

    def get(method: str):
        if method not in cache:
            pipe = load(*ckpt)
            applied = cpu_backend().prepare(pipe, MemoryConfig(quantization=method), SPEC)
            cache[method] = (pipe, applied, generate(pipe))
        return cache[method]

    return get


# ------------------------------------------------------------------------------------------ presets


def test_expected_presets_exist():
    assert EXPECTED_PRESETS <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_and_points_to_its_predicted_figures(name):
    memory = load_preset(name)
    assert isinstance(memory, MemoryConfig)
    assert memory.name == name
    text = (PRESET_DIR / f"{name}.yaml").read_text()
    if name != "auto":  # figures: the README's generated memory table (tests/test_readme_tables.py)
        assert "README's memory" in text and "not yet measured" in text
    memory_policy.check(memory, cpu_backend())  # every preset is valid on the CPU


@pytest.mark.parametrize("name", PRESETS)
def test_preset_applies_on_cpu_and_keeps_the_result(name, ckpt, ref, caplog):
    from accelerate.hooks import AlignDevicesHook, CpuOffload

    memory = load_preset(name)
    pipe = load(*ckpt)
    caplog.set_level(logging.INFO, logger="backends.memory")
    applied = cpu_backend().prepare(pipe, memory, SPEC)
    assert applied["memory_preset"] == name

    if memory.model_cpu_offload:
        for module in (pipe.transformer, pipe.vae, *text_encoders(pipe)):
            assert isinstance(module._hf_hook, CpuOffload)
    if memory.sequential_cpu_offload:
        leaf = pipe.transformer.transformer_blocks[0].attn.to_q
        assert isinstance(leaf._hf_hook, AlignDevicesHook) and leaf._hf_hook.offload
        assert leaf._hf_hook.execution_device == torch.device("cpu")
    assert group_offloaded(pipe.transformer) == memory.group_offload
    if memory.group_offload:
        assert "stream False" in applied["placement"]
        if memory.group_offload_stream:  # presets made for CUDA streams fall back here, and say so
            assert "without streams" in caplog.text
        for module in text_encoders(pipe):
            assert group_offloaded(module) == (memory.text_encoders == "offload")
    assert pipe.vae.use_tiling == bool(memory.vae_tiling)  # null: untiled unless a budget needs it
    assert pipe.vae.use_slicing == memory.vae_slicing
    if memory.text_encoders == "release":
        assert pipe.text_encoder_placement == "release"
    if memory.quantization == "bnb_int8":
        import bitsandbytes as bnb

        for part in memory.quantize or SPEC.quantize_default:
            assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in getattr(pipe, part).modules())

    mode = guidance_mode(memory)
    out = generate(pipe, mode)
    if memory.quantization == "none":
        assert rel_err(out, ref[mode]) < EXACT_REL
    else:
        assert not torch.equal(out, ref[mode])
        assert rel_err(out, ref[mode]) < QUANT_REL[memory.quantization]
        assert cosine(out, ref[mode]) > 0.999


# ------------------------------------------------------------------------------------------ placement


# Placements the presets don't cover (they cover model, sequential and group offload with each text-encoder mode).
@pytest.mark.parametrize(
    "memory",
    [
        MemoryConfig(group_offload=True, group_offload_blocks=2, group_offload_stream=False, text_encoders="offload"),
        MemoryConfig(text_encoders="cpu"),
        MemoryConfig(text_encoders="release"),
    ],
    ids=["group_offload_2_blocks", "te_cpu", "te_release"],
)
def test_placement_keeps_the_result(memory, ckpt, ref):
    pipe = load(*ckpt)
    cpu_backend().prepare(pipe, memory, SPEC)
    assert rel_err(generate(pipe), ref["batched"]) < EXACT_REL


def test_text_encoder_modes_reach_the_pipeline():
    cases = [
        (MemoryConfig(), "device", "resident"),
        (MemoryConfig(text_encoders="auto"), "device", "resident"),
        (MemoryConfig(text_encoders="cpu"), "cpu", "cpu"),
        (MemoryConfig(text_encoders="release"), "release", "release"),
        (MemoryConfig(group_offload=True, text_encoders="auto"), "release", "release"),
        (MemoryConfig(group_offload=True, text_encoders="offload"), "offload", "resident"),
        (MemoryConfig(model_cpu_offload=True, text_encoders="auto"), "offload", "resident"),
    ]
    for memory, mode, placement in cases:
        pipe = types.SimpleNamespace(text_encoder_placement=None)
        assert mem.place_text_encoders(pipe, memory, torch.device("cpu")) == mode
        assert pipe.text_encoder_placement == placement


@pytest.mark.parametrize("mode", ["release", "cpu"])
def test_released_text_encoders_are_left_to_the_pipeline(mode, ckpt):
    pipe = load(*ckpt)
    cpu_backend().prepare(pipe, MemoryConfig(group_offload=True, text_encoders=mode), SPEC)
    assert group_offloaded(pipe.transformer)
    assert not any(group_offloaded(m) for m in text_encoders(pipe))
    assert pipe.text_encoder_placement == mode


def test_vae_slicing_decodes_like_the_whole_batch(ckpt):
    pipe = load(*ckpt)
    z = torch.randn(2, 16, 1, 4, 6, generator=torch.Generator().manual_seed(0))  # (B, C, T, h, w)
    with torch.no_grad():
        whole = pipe.vae.decode(z).sample
        mem.vae_options(pipe, MemoryConfig(vae_slicing=True, vae_tiling=True))
        assert pipe.vae.use_slicing and pipe.vae.use_tiling
        # 32x48 frames are below the VAE's 256-pixel tile, so tiling leaves this decode untiled.
        sliced_ = pipe.vae.decode(z).sample
    assert rel_err(sliced_, whole) < EXACT_REL


# ------------------------------------------------------------------------------------------ attention slicing


@pytest.mark.parametrize("chunk", [1, 7, 16, 64, 1000])
def test_sliced_attention_equals_unchunked(chunk):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 64, 16, generator=g) for _ in range(3))  # (B, H, S, D)
    out = sliced(sdpa, chunk)(q, k, v)
    torch.testing.assert_close(out, sdpa(q, k, v), rtol=1e-5, atol=1e-6)


def test_attention_slicing_on_the_model(ckpt, ref):
    pipe = load(*ckpt)
    applied = cpu_backend().prepare(pipe, MemoryConfig(attention_slicing=5), SPEC)
    assert "query chunks of 5" in applied["attention_kernel"]
    assert rel_err(generate(pipe), ref["batched"]) < EXACT_REL


# ------------------------------------------------------------------------------------------ quantization


@pytest.mark.parametrize("method", sorted(QUANT_REL))
def test_quantization_changes_the_result_a_little(method, quantized, ref):
    pipe, applied, out = quantized(method)
    assert applied["quantization"] == f"{method}: transformer, text_encoder_3"
    assert not torch.equal(out, ref["batched"]), "quantization did nothing"
    assert rel_err(out, ref["batched"]) < QUANT_REL[method]
    assert cosine(out, ref["batched"]) > 0.999
    # Components not listed stay as loaded.
    assert type(pipe.text_encoder.text_model.encoder.layers[0].mlp.fc1) is nn.Linear


def test_bnb_int8_weights_are_int8(quantized):
    import bitsandbytes as bnb

    pipe, _, _ = quantized("bnb_int8")
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(layer, bnb.nn.Linear8bitLt) and not layer.training
    w = layer.weight
    assert isinstance(w, bnb.nn.Int8Params) and w.dtype == torch.int8 and w.device.type == "cpu"
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.shape == (layer.out_features,)
    # Kept in full precision: projections, embeddings/norms, and T5's `wo` (transformers' _keep_in_fp32_modules).
    assert type(pipe.transformer.proj_out) is nn.Linear
    assert type(pipe.transformer.context_embedder) is nn.Linear
    assert type(pipe.text_encoder_3.encoder.block[0].layer[1].DenseReluDense.wo) is nn.Linear
    assert isinstance(pipe.text_encoder_3.encoder.block[0].layer[1].DenseReluDense.wi_0, bnb.nn.Linear8bitLt)


def test_bnb_int8_layer_holds_CB_and_SCB_after_move_and_runs():
    import bitsandbytes as bnb

    linear = nn.Linear(64, 32).eval()
    layer = mem._bnb_int8(linear)
    layer.to(torch.device("cpu"))
    w = layer.weight
    assert isinstance(w, bnb.nn.Int8Params) and w.dtype == torch.int8
    assert w.CB is not None and w.CB.dtype == torch.int8 and w.SCB is not None and w.SCB.shape == (32,)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, exact = layer(x), linear(x)
    assert not torch.equal(out, exact) and rel_err(out, exact) < 2e-2


def test_bnb_int8_reads_the_weight_where_hooks_put_it():
    # bitsandbytes caches the int8 weight in layer.state on the first call; offload hooks move layer.weight.
    linear = nn.Linear(64, 32).eval()
    layer = mem._bnb_int8(linear)
    x = torch.randn(4, 64)
    with torch.no_grad():
        layer(x)
        assert layer.state.CB is None  # nothing cached between calls
        layer.weight.data = torch.zeros_like(layer.weight.data)  # what a hook's `param.data = ...` does
        out = layer(x)
    torch.testing.assert_close(out, linear.bias.expand(4, -1), rtol=0, atol=1e-3)


def test_bnb_nf4_weights_are_4bit(quantized):
    import bitsandbytes as bnb

    pipe, _, _ = quantized("bnb_nf4")
    layer = pipe.transformer.transformer_blocks[0].ff.net[2]
    assert isinstance(layer, bnb.nn.Linear4bit) and not layer.training
    assert isinstance(layer.weight, bnb.nn.Params4bit) and layer.weight.bnb_quantized
    assert layer.weight.quant_state is not None and layer.weight.quant_state.quant_type == "nf4"
    assert layer.compute_dtype == torch.float32  # the component's own dtype


def _nf4_generic(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the generic 4-bit path computes: the dequantized weight, then F.linear in the compute dtype."""
    from bitsandbytes.functional import dequantize_4bit

    weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(layer.compute_dtype)
    return F.linear(x.to(layer.compute_dtype), weight, layer.bias)


def test_bnb_nf4_in_fp32_computes_the_same_on_every_cpu():
    """Issue 18 §4. On a CPU with AVX512-BF16, Linear4bit.forward repacks its weight for a fused kernel that
    rounds the input to bf16; an fp32 layer must not (it would differ from every other CPU and every device by
    ~1e-3). Can only fail on such a CPU (conftest's report header says whether this one has it)."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 64).eval()  # shapes the fused kernel takes (out % 32, in % 64)
    layer = mem._bnb_nf4(linear)
    x = torch.randn(4, 128)
    with torch.no_grad():
        out = layer(x)
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
        assert torch.equal(out, _nf4_generic(layer, x))


def test_bnb_nf4_packed_for_the_cpu_still_runs_on_a_device():
    """A bf16 layer may take the AVX512-BF16 kernel on the CPU, which repacks its weight in place; only
    Params4bit.cuda()/.xpu() undo that, not a module's .to(): on the device it must compute the generic path's
    result, not read the packed layout. Can only fail on a CPU with AVX512-BF16."""
    torch.manual_seed(0)
    linear = nn.Linear(128, 64).to(torch.bfloat16).eval()
    layer = mem._bnb_nf4(linear)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    with torch.no_grad(), VirtualDevice() as vd:
        layer(x)  # packs where the CPU can
        layer.to(vd.device)
        out = layer(x.to(vd.device)).cpu()
        layer.to("cpu")
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
        expected = _nf4_generic(layer, x)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)  # bf16: one rounding of the absmax, ~1e-2


def test_fp8_stores_float8_and_keeps_embeddings(quantized):
    pipe, _, _ = quantized("fp8")
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert pipe.text_encoder_3.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn
    # Skipped: diffusers' defaults (norms, pos_embed, proj_out), our projections, embeddings, T5's `wo`.
    assert pipe.transformer.proj_out.weight.dtype == torch.float32
    assert pipe.text_encoder_3.shared.weight.dtype == torch.float32
    assert pipe.text_encoder_3.dtype == torch.float32  # what the SD3 prompt encoding casts to
    assert pipe.text_encoder_3.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32


def test_torchao_int8_replaces_weights_with_int8_tensors(quantized):
    from torchao.utils import TorchAOBaseTensor

    pipe, _, _ = quantized("torchao_int8")
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_q.weight, TorchAOBaseTensor)
    assert isinstance(pipe.text_encoder_3.encoder.block[0].layer[0].SelfAttention.q.weight, TorchAOBaseTensor)
    assert not isinstance(pipe.transformer.proj_out.weight, TorchAOBaseTensor)


@pytest.mark.parametrize(
    "memory",
    [
        MemoryConfig(quantization="bnb_int8", group_offload=True, text_encoders="offload"),
        MemoryConfig(quantization="bnb_nf4", model_cpu_offload=True, text_encoders="auto"),
        MemoryConfig(quantization="fp8", sequential_cpu_offload=True, text_encoders="auto"),
        MemoryConfig(quantization="torchao_int8", group_offload=True, text_encoders="offload"),
    ],
    ids=["bnb_int8+group", "bnb_nf4+model", "fp8+sequential", "torchao+group"],
)
def test_quantization_with_offload_matches_quantization_alone(memory, ckpt, quantized):
    _, _, alone = quantized(memory.quantization)
    pipe = load(*ckpt)
    cpu_backend().prepare(pipe, memory, SPEC)
    assert rel_err(generate(pipe), alone) < EXACT_REL


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "memory, option, words",
    [
        (
            MemoryConfig(model_cpu_offload=True, sequential_cpu_offload=True),
            "memory.sequential_cpu_offload",
            "model_cpu_offload",
        ),
        (
            MemoryConfig(group_offload=True, model_cpu_offload=True, text_encoders="auto"),
            "memory.group_offload",
            "pick one",
        ),
        (MemoryConfig(group_offload_blocks=0), "memory.group_offload_blocks", ">= 1"),
        (MemoryConfig(attention_slicing=-1), "memory.attention_slicing", "chunk size"),
        (MemoryConfig(guidance_mode="both"), "memory.guidance_mode", "sequential"),
        (MemoryConfig(text_encoders="gpu"), "memory.text_encoders", "release"),
        (MemoryConfig(model_cpu_offload=True, text_encoders="device"), "memory.text_encoders", "auto or offload"),
        (MemoryConfig(sequential_cpu_offload=True, text_encoders="release"), "memory.text_encoders", "auto or offload"),
        (MemoryConfig(model_cpu_offload=True, text_encoders="cpu"), "memory.text_encoders", "auto or offload"),
        (MemoryConfig(text_encoders="offload"), "memory.text_encoders", "group_offload"),
        (MemoryConfig(quantization="int4"), "memory.quantization", "torchao_int8"),
        (
            MemoryConfig(quantization="bnb_int8", sequential_cpu_offload=True, text_encoders="auto"),
            "memory.quantization",
            "group_offload or model_cpu_offload",
        ),
    ],
)
def test_contradictions_are_config_errors(memory, option, words):
    with pytest.raises(ConfigError) as err:
        memory_policy.check(memory, cpu_backend())
    assert err.value.option == option
    assert words in str(err.value)


@pytest.mark.parametrize("method", ["bnb_int8", "bnb_nf4"])
def test_bnb_on_a_backend_without_it_names_the_alternatives(method):
    with pytest.raises(ConfigError) as err:
        memory_policy.check(MemoryConfig(quantization=method), stub_backend())
    assert err.value.option == "memory.quantization" and err.value.value == method
    assert "npu" in str(err.value) and "fp8" in str(err.value) and "torchao_int8" in str(err.value)


def test_stream_groups_must_be_single_blocks_where_streams_exist():
    memory = MemoryConfig(group_offload=True, group_offload_blocks=2)
    with pytest.raises(ConfigError, match="group_offload_blocks"):
        memory_policy.check(memory, stub_backend(name="cuda", streams=True, methods=memory_policy.QUANTIZATIONS))
    memory_policy.check(memory, cpu_backend())  # no streams here: groups of 2 copied synchronously
    memory_policy.check(
        MemoryConfig(group_offload=True, group_offload_blocks=2, group_offload_stream=False), stub_backend(streams=True)
    )


def test_model_and_sequential_offload_together_fail_before_anything_moves(ckpt):
    pipe = load(*ckpt)
    with pytest.raises(ConfigError, match="pick one"):
        cpu_backend().prepare(pipe, MemoryConfig(model_cpu_offload=True, sequential_cpu_offload=True), SPEC)
    assert not hasattr(pipe.transformer, "_hf_hook")


def test_unknown_component_to_quantize_lists_the_components(ckpt):
    pipe = load(*ckpt)
    with pytest.raises(ConfigError) as err:
        mem.quantize(pipe, MemoryConfig(quantization="fp8", quantize=["unet"]), cpu_backend())
    assert err.value.option == "memory.quantize" and "transformer" in str(err.value)


def test_cpu_backend_offers_every_quantization():
    assert set(cpu_backend().quantization_methods()) == set(memory_policy.QUANTIZATIONS)
    assert cpu_backend().supports_offload_streams is False


# ------------------------------------------------------------------------------------------ CUDA


def cuda_backend():
    return backends.build_backend(BackendConfig(name="cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["bnb_int8", "bnb_nf4"])
def test_group_offload_with_streams_and_bnb_on_cuda(method, ckpt, quantized):
    _, _, cpu_out = quantized(method)
    pipe = load(*ckpt)
    memory = MemoryConfig(group_offload=True, group_offload_stream=True, text_encoders="offload", quantization=method)
    applied = cuda_backend().prepare(pipe, memory, SPEC)
    assert "stream True" in applied["placement"]
    out = generate(pipe)
    assert cosine(out, cpu_out) > 0.999
    # Offloaded between calls: the quantized weights are back on the host.
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.device.type == "cpu"


@pytest.mark.cuda
def test_int8_preset_on_cuda_offloads_the_int8_weights(ckpt, ref):
    pipe = load(*ckpt)
    cuda_backend().prepare(pipe, load_preset("int8"), SPEC)
    out = generate(pipe)
    assert cosine(out, ref["batched"]) > 0.999
    for module in pipe.transformer.modules():
        if hasattr(module, "weight_scale"):
            assert module.weight.device.type == "cpu" and module.state.CB is None


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["low_vram_24g", "low_vram_16g", "low_vram_8g", "model_offload"])
def test_presets_on_cuda_match_the_cpu(name, ckpt, ref):
    memory = load_preset(name)
    pipe = load(*ckpt)
    applied = cuda_backend().prepare(pipe, memory, SPEC)
    if memory.group_offload:
        assert "stream True" in applied["placement"]
    out = generate(pipe, guidance_mode(memory))
    assert rel_err(out, ref[guidance_mode(memory)]) < 1e-3


def test_bitsandbytes_before_0_48_is_refused_with_the_fix(monkeypatch):
    """bitsandbytes 0.45-0.47 keep every layer's int8 copy on the GPU after quantizing (~12.8 GB for ContentV)."""
    import importlib.metadata

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda p: "0.47.0" if p == "bitsandbytes" else real(p))
    with pytest.raises(ConfigError, match=r"bitsandbytes >= 0\.48 \(0\.47\.0 is installed\)"):
        memory_policy.check(MemoryConfig(quantization="bnb_int8", model_cpu_offload=True), cpu_backend())
    monkeypatch.setattr(importlib.metadata, "version", lambda p: "0.48.0" if p == "bitsandbytes" else real(p))
    memory_policy.check(MemoryConfig(quantization="bnb_nf4", model_cpu_offload=True), cpu_backend())


@pytest.mark.parametrize("streams", [True, False])
def test_group_offload_with_streams_records_them(ckpt, monkeypatch, streams):
    """With a side stream, diffusers must be told to record it (else it synchronizes the host at every block
    offload). Contract on the CPU: the arguments handed to diffusers (a CPU build can't pin memory for streams)."""
    from diffusers import ModelMixin

    seen = []
    monkeypatch.setattr(ModelMixin, "enable_group_offload", lambda self, **kw: seen.append(kw))
    monkeypatch.setattr("diffusers.hooks.apply_group_offloading", lambda module, **kw: seen.append(kw))
    pipe = load(*ckpt)
    memory = MemoryConfig(group_offload=True, group_offload_stream=True, text_encoders="offload")
    mem.place(pipe, memory, torch.device("cpu"), streams=streams)
    assert len(seen) == 4  # the transformer (block level) and three text encoders (leaf level)
    assert all(kw["use_stream"] is streams and kw["record_stream"] is streams for kw in seen)
    assert all(kw["non_blocking"] is streams and kw["onload_device"] == torch.device("cpu") for kw in seen)


def test_the_host_waits_once_it_is_run_ahead_groups_ahead_of_compute(monkeypatch):
    """Issue 18 §3: with record_stream a freed group stays reserved until compute reaches it; the host must not
    queue more than GROUP_OFFLOAD_RUN_AHEAD groups ahead. Fake stream events on the CPU record the order; the GPU
    check measures the reserved peak (each low-VRAM preset capped at its card size)."""
    log = []

    class Event:
        def __init__(self, i: int):
            self.i = i

        def synchronize(self) -> None:
            log.append(f"wait {self.i}")

    class Stream:
        count = 0

        def record_event(self) -> Event:
            Stream.count += 1
            log.append(f"record {Stream.count}")
            return Event(Stream.count)

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(5))
    mem.bound_run_ahead(list(blocks), torch.device("cuda", 0), depth=2)
    x = torch.randn(1, 4)
    for block in blocks:
        x = block(x)
    assert log == ["record 1", "record 2", "record 3", "wait 1", "record 4", "wait 2", "record 5", "wait 3"]


@pytest.mark.parametrize("streams", [True, False])
def test_group_offload_with_streams_bounds_every_group(ckpt, monkeypatch, streams):
    from diffusers import ModelMixin

    bounded = []
    monkeypatch.setattr(ModelMixin, "enable_group_offload", lambda self, **kw: None)
    monkeypatch.setattr("diffusers.hooks.apply_group_offloading", lambda module, **kw: None)
    monkeypatch.setattr(mem, "bound_run_ahead", lambda groups, device, depth: bounded.append((groups, depth)))
    pipe = load(*ckpt)
    memory = MemoryConfig(group_offload=True, group_offload_stream=True, text_encoders="offload")
    mem.place(pipe, memory, torch.device("cpu"), streams=streams)
    if not streams:
        assert bounded == []
        return
    assert len(bounded) == 4 and {depth for _, depth in bounded} == {memory_policy.GROUP_OFFLOAD_RUN_AHEAD}
    blocks = list(pipe.transformer.transformer_blocks)
    assert [groups for groups, _ in bounded].count(blocks) == 1  # block level: each block is a group
    leaves = [groups for groups, _ in bounded if groups != blocks]  # the text encoders, leaf level
    assert all(groups and all(isinstance(m, (nn.Linear, nn.Embedding)) for m in groups) for groups in leaves)


# ------------------------------------------------------------------ vae_tiling=null: decided per video


def test_vae_tiling_null_is_decided_per_video_and_recorded(cache_dir, tmp_path, caplog):
    """One loaded pipeline; the planner tiles the decode of the video whose untiled decode won't fit
    memory.budget_gb (tiny ContentV at 256x384 is predicted at ~139 MiB untiled, ~114 MiB tiled) and not the
    small one's; the sidecar says what ran."""
    from contentv.runtime import Runtime

    presets = demo.load_presets(("model", "memory"))
    runtime = Runtime(cpu_backend(), presets=presets.memories)
    caplog.set_level(logging.INFO, logger="contentv.resolve")  # where the run is decided, once
    ran = {}
    for height, width, frames in ((256, 384, 9), (32, 48, 5)):
        cfg = RunConfig(model=copy.deepcopy(presets.models["tiny_contentv"]), backend=BackendConfig(name="cpu"))
        cfg.memory = MemoryConfig(name="budgeted", vae_tiling=None, budget_gb=0.125)
        cfg.sampling = SamplingConfig(
            prompt="a red fox", height=height, width=width, num_frames=frames, num_inference_steps=1
        )
        cfg.output.dir = str(tmp_path)
        result = runtime.run(cfg)
        record = json.loads(result.sidecar.read_text())
        ran[height] = (
            record["config"]["memory"]["vae_tiling"],
            result.prepared["vae_tiling"],
            runtime._pipe.vae.use_tiling,
        )
        tiling_noted = any(c.startswith("vae_tiling") for c in record["prepared"]["output_changes"])
        assert tiling_noted == (height == 256), record["prepared"]["output_changes"]  # what changed this video
    assert ran == {256: (True, True, True), 32: (False, False, False)}
    assert runtime.loads == 1
    assert "memory.vae_tiling=null: tiled for this video" in caplog.text
    assert "memory.vae_tiling=null: untiled for this video" in caplog.text
