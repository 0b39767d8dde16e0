"""The device matrix (issue 11 §2): every model family x memory strategy x guidance mode, run by the real runtime
(`Runtime(VirtualBackend).generate`, so `Backend.prepare` and backends/memory.py place the weights) on the virtual
accelerator, where a cross-device operation raises: a run that completes made none.

Asserted per run: frames close to the CPU run of the same (family, guidance, output-changing settings); with the
weights resident while denoising, no host->device copy inside any transformer forward and no weight-sized copy
anywhere in the loop; under offload, a lower device peak than everything resident and the transformer's weights
crossing during the loop; text encoders where their mode leaves them.

Covering design (36 device runs, 16 CPU references, ~1 s each with one thread): `none` on all three families x
both guidance modes (each family's resident peak is the baseline of its offload runs); every other strategy twice,
ContentV and CogVideoX-5B with opposite guidance modes, alternating from one strategy to the next, so every
strategy meets both families and both guidance modes, and each (family, guidance) pair meets half the strategies.
The full product (64 runs) would also run each strategy with the other guidance mode on the same family:
guidance changes only the batch (2 or 1) and the forwards per step (1 or 2), which every family meets under `none`
and half the strategies. The 2B-style CogVideoX differs from the 5B only in its positional embedding: `none` only.

Tolerances (max |frame difference|, frames in [0, 1]): one bound, 1e-5, for every case. Measured: CogVideoX 0
(bit-exact) in every case; ContentV <= 1.7e-6 in every case, quantized ones included (not bit-exact: device copies
are 64-byte aligned, so BLAS rounds one ulp differently, see test_virtual_device).

Found on the way (not a runtime bug): CogVideoX-5B's DPM scheduler draws its per-step noise with the CPU generator
(rule 12: the same noise on every device) and copies it up, one latent per step, and syncs the host twice per step
(`.item()` in diffusers' scheduling_dpm_cogvideox.py); the resident-weights test allows exactly that noise.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest
from torch import nn

import demo
from contentv.config import BackendConfig, MemoryConfig, RunConfig
from contentv.runtime import Runtime
from tests.virtual_device import CopyLog

pytestmark = pytest.mark.usefixtures("single_thread")

CONTENTV, COG5B, COG2B = "tiny_contentv", "tiny_cogvideox_5b", "tiny_cogvideox"
GUIDANCE = ("batched", "sequential")
TOL = 1e-5
M = MemoryConfig
MODELS = demo.load_presets(("model",)).models  # as the command line composes model=<name>


@dataclass(frozen=True)
class Strategy:
    memory: MemoryConfig
    encoders_after: str = "lazy"  # device type of the text encoders' weights after a run
    encoders_uploaded: bool = False  # the text encoders' weights go up for each video
    lowers_peak: bool = False  # some weights are off the device while others work: the peak must drop
    offload: bool = False  # the transformer's weights cross to the device while denoising


OFFLOAD = dict(lowers_peak=True, offload=True)
STRATEGIES = {
    "none": Strategy(M()),
    "text_encoders_release": Strategy(M(text_encoders="release"), "cpu", encoders_uploaded=True),
    "text_encoders_cpu": Strategy(M(text_encoders="cpu"), "cpu", lowers_peak=True),
    # text_encoders=auto under model/sequential offload = offload: the hooks place them.
    "model_cpu_offload": Strategy(M(model_cpu_offload=True), "cpu", encoders_uploaded=True, **OFFLOAD),
    "sequential_cpu_offload": Strategy(M(sequential_cpu_offload=True), "meta", encoders_uploaded=True, **OFFLOAD),
    # text_encoders=auto under group offload = release.
    "group_offload": Strategy(M(group_offload=True), "cpu", encoders_uploaded=True, **OFFLOAD),
    "group_offload_text_encoders_offload": Strategy(
        M(group_offload=True, text_encoders="offload"), "cpu", encoders_uploaded=True, **OFFLOAD
    ),
    "group_offload_text_encoders_cpu": Strategy(M(group_offload=True, text_encoders="cpu"), "cpu", **OFFLOAD),
    "group_offload_text_encoders_device": Strategy(M(group_offload=True, text_encoders="device"), **OFFLOAD),
    "vae_slicing": Strategy(M(vae_slicing=True)),
    "vae_tiling": Strategy(M(vae_tiling=True)),
    "attention_slicing": Strategy(M(attention_slicing=64)),  # 345 / 244 joint tokens: 6 / 4 query chunks
    "bnb_int8": Strategy(M(quantization="bnb_int8")),
    "bnb_nf4": Strategy(M(quantization="bnb_nf4")),
    "fp8": Strategy(M(quantization="fp8")),
    "torchao_int8": Strategy(M(quantization="torchao_int8")),
}
CASES = [("none", family, g) for family in (CONTENTV, COG5B, COG2B) for g in GUIDANCE] + [
    (name, family, GUIDANCE[(i + j) % 2])
    for i, name in enumerate(n for n in STRATEGIES if n != "none")
    for j, family in enumerate((CONTENTV, COG5B))
]


def case_id(case: tuple[str, str, str]) -> str:
    return "-".join(case)


def run_config(family: str, memory: MemoryConfig, guidance: str, backend: str) -> RunConfig:
    cfg = RunConfig(backend=BackendConfig(name=backend))
    cfg.model = copy.deepcopy(MODELS[family])
    cfg.memory = dataclasses.replace(memory, guidance_mode=guidance)
    s = cfg.sampling
    s.prompt, s.height, s.width, s.num_inference_steps = "a red fox walks in snow", 32, 48, 1
    s.num_frames = 5 if family == CONTENTV else 9
    return cfg


def small_tiles(pipe, memory: MemoryConfig) -> None:
    """Wan's tiles are 256 px, so a 32x48 video would decode untiled: 32 px tiles with 16 px strides make the
    tiled decoder really run (CogVideoX's tiny VAE already tiles 48 px wide frames)."""
    if memory.vae_tiling and type(pipe.vae).__name__ == "AutoencoderKLWan":
        pipe.vae.enable_tiling(32, 32, 16, 16)


def nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


@dataclass
class DeviceRun:
    frames: np.ndarray
    forwards: list[CopyLog]  # one per transformer forward
    loop: CopyLog  # the denoising loop: first transformer forward to the end of the last step
    total: CopyLog  # the whole generate call
    peak: int  # device bytes, max over the call's stages
    transformer_bytes: int
    smallest_weight: int  # bytes of the transformer's smallest weight matrix
    text_encoder_bytes: int
    text_encoder_devices: set[str]
    prepared: dict


def run_on_device(backend, family: str, memory: MemoryConfig, guidance: str) -> DeviceRun:
    vd = backend.vd
    cfg = run_config(family, memory, guidance, "virtual")
    runtime = Runtime(backend)
    pipe = runtime.pipeline(cfg)  # load + Backend.prepare (placement, quantization, ...)
    small_tiles(pipe, memory)
    forwards: list[CopyLog] = []
    loop: list[CopyLog] = []
    in_loop, in_forward = contextlib.ExitStack(), contextlib.ExitStack()

    def pre(*_):
        if not loop:
            loop.append(in_loop.enter_context(vd.copies()))
        forwards.append(in_forward.enter_context(vd.copies()))

    def step_end(_pipe, i, _t, _kw):
        if i == cfg.sampling.num_inference_steps - 1:
            in_loop.close()
        return {}

    hooks = [
        pipe.transformer.register_forward_pre_hook(pre),
        pipe.transformer.register_forward_hook(lambda *_: in_forward.close()),
    ]
    vd.reset_copies()
    try:
        result = runtime.generate(cfg, callback_on_step_end=step_end)
    finally:
        in_forward.close()
        in_loop.close()
        for h in hooks:
            h.remove()
    encoders = pipe.text_encoder_modules()
    matrices = [p for p in pipe.transformer.parameters() if p.dim() >= 2]
    run = DeviceRun(
        frames=result.frames,
        forwards=forwards,
        loop=loop[0],
        total=vd.log,
        peak=max(s["peak_device_bytes"] for s in result.stages.values()),
        transformer_bytes=nbytes(pipe.transformer),
        smallest_weight=min(p.numel() * p.element_size() for p in matrices),
        text_encoder_bytes=sum(nbytes(m) for m in encoders),
        text_encoder_devices={p.device.type for m in encoders for p in m.parameters()},
        prepared=result.prepared,
    )
    runtime.release()
    return run


@pytest.fixture(scope="module")
def device_runs(virtual_backend):
    cache: dict[tuple, DeviceRun] = {}

    def get(name: str, family: str, guidance: str) -> DeviceRun:
        key = (name, family, guidance)
        if key not in cache:
            cache[key] = run_on_device(virtual_backend, family, STRATEGIES[name].memory, guidance)
        return cache[key]

    return get


def test_the_design_covers_every_strategy_with_every_family_and_guidance_mode():
    for name in STRATEGIES:
        cases = [(f, g) for n, f, g in CASES if n == name]
        assert {f for f, _ in cases} >= {CONTENTV, COG5B} and {g for _, g in cases} == set(GUIDANCE), name
    assert {f for n, f, _ in CASES if n == "none"} == {CONTENTV, COG5B, COG2B}
    assert len(CASES) == len(set(CASES)) == 36


@pytest.mark.slow
def reference(cpu_frames, family: str, memory: MemoryConfig, guidance: str) -> np.ndarray:
    """The CPU run a device run must match: everything resident, with the case's settings that change the output
    (quantization, VAE tiling: the tiles made as small as the device run's)."""
    ref = M(quantization=memory.quantization, vae_tiling=memory.vae_tiling)
    return cpu_frames(run_config(family, ref, guidance, "cpu"), "small tiles", lambda pipe: small_tiles(pipe, ref))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_runs_on_the_device_and_matches_the_cpu(case, device_runs, cpu_frames):
    name, family, guidance = case
    strategy = STRATEGIES[name]
    run = device_runs(*case)
    expected = reference(cpu_frames, family, strategy.memory, guidance)
    diff = float(np.abs(run.frames - expected).max())
    assert run.frames.shape == expected.shape and diff <= TOL, diff
    assert len(run.forwards) == (1 if guidance == "batched" else 2)  # one step: the guidance mode reached the loop
    if strategy.memory.vae_tiling:  # the tiled decoder ran: the frames differ from an untiled decode
        untiled = reference(cpu_frames, family, M(quantization=strategy.memory.quantization), guidance)
        assert np.abs(run.frames - untiled).max() > 1e-3


@pytest.mark.parametrize("case", [c for c in CASES if not STRATEGIES[c[0]].offload], ids=case_id)
def test_resident_weights_are_never_copied_while_denoising(case, device_runs):
    run = device_runs(*case)
    assert run.prepared["placement"] == "device"
    assert [f.h2d_count for f in run.forwards] == [0] * len(run.forwards), "\n".join(f.summary() for f in run.forwards)
    # Allowed: small inputs, and CogVideoX-5B's DPM scheduler noise (one latent per step, drawn by the CPU
    # generator so every device gets the same noise: rule 12). Not allowed: anything the size of a weight.
    weight_sized = [
        r for r in run.loop.of("h2d") if r.nbytes >= run.smallest_weight and not r.origin.endswith("in randn_tensor")
    ]
    assert not weight_sized, run.loop.summary()


@pytest.mark.parametrize("case", [c for c in CASES if STRATEGIES[c[0]].lowers_peak], ids=case_id)
def test_offload_lowers_the_peak(case, device_runs):
    name, family, guidance = case
    run, resident = device_runs(*case), device_runs("none", family, guidance)
    assert run.peak < resident.peak, (run.peak, resident.peak)


@pytest.mark.parametrize("case", [c for c in CASES if STRATEGIES[c[0]].offload], ids=case_id)
def test_offloaded_weights_cross_while_denoising(case, device_runs):
    run = device_runs(*case)
    assert run.loop.h2d_bytes >= run.transformer_bytes, (run.loop.h2d_bytes, run.transformer_bytes)
    assert run.forwards[0].h2d_count > 0  # onloaded by the hooks inside the forward


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_text_encoders_end_where_their_mode_leaves_them(case, device_runs):
    name, family, guidance = case
    strategy, run = STRATEGIES[name], device_runs(*case)
    assert run.text_encoder_devices == {strategy.encoders_after}
    if strategy.encoders_uploaded:
        assert run.total.h2d_bytes >= run.text_encoder_bytes + (run.transformer_bytes if strategy.offload else 0)
