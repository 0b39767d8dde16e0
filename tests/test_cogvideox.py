"""CogVideoX family on the two tiny checkpoints (2B-style sin-cos, 5B-style RoPE), CPU only, offline."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from contentv.attention import sdpa, sliced
from contentv.config import MemoryConfig, ModelConfig, RunConfig, SamplingConfig, resolve_sampling
from contentv.errors import ConfigError, GenerationCancelled
from contentv.models.cogvideox import SPEC
from contentv.models.cogvideox.attention import CogVideoXKernelAttnProcessor
from contentv.models.cogvideox.pipeline import CogVideoXRuntimePipeline
from tests.helpers import demo_env

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("tiny_cogvideox", "tiny_cogvideox_5b")
# Small and quick: the tiny model's native 64x96, 9 frames (3 latent frames), 2 steps (DPM's second
# step uses its multistep branch).
CALL = dict(prompt="a red fox in snow", num_inference_steps=2)


def tiny_cfg(name: str) -> ModelConfig:
    return ModelConfig(name=name, family="cogvideox", path=None, tiny=True, dtype="float32", vae_dtype="float32")


@pytest.fixture(scope="module")
def ckpts(cache_dir) -> dict[str, str]:
    """Each tiny variant built once per test session, in the session's shared cache (tests/conftest.py)."""
    return {name: SPEC.resolve_path(tiny_cfg(name)) for name in VARIANTS}


@pytest.fixture(scope="module")
def pipes(ckpts) -> dict[str, CogVideoXRuntimePipeline]:
    """One pipeline per variant for the tests that don't change it (placement, attention, hooks)."""
    return {name: load(ckpts, name) for name in VARIANTS}


def load(ckpts, name: str, kernel=sdpa) -> CogVideoXRuntimePipeline:
    """Our pipeline through the spec's loading code, with our attention processor."""
    pipe = SPEC.load(tiny_cfg(name), ckpts[name])
    SPEC.install_attention(pipe, kernel)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ checkpoint, loading


@pytest.mark.parametrize("name", VARIANTS)
def test_tiny_checkpoint_layout_and_components(ckpts, name):
    folder = Path(ckpts[name])
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / sub).is_dir()
    SPEC.check_checkpoint(str(folder))
    pipe = load(ckpts, name)
    rope = name.endswith("_5b")
    assert pipe.transformer.config.use_rotary_positional_embeddings is rope
    assert type(pipe.scheduler).__name__ == ("CogVideoXDPMScheduler" if rope else "CogVideoXDDIMScheduler")
    assert pipe.tokenizer.model_max_length == 226
    assert all(isinstance(p, CogVideoXKernelAttnProcessor) for p in pipe.transformer.attn_processors.values())


def test_tiny_variant_is_chosen_by_name(cache_dir):
    with pytest.raises(ConfigError, match="model.name"):
        SPEC.resolve_path(tiny_cfg("tiny_cogvideox_xl"))


def test_check_checkpoint_rejects_other_models(ckpts, tmp_path):
    """Reads configs only: a ContentV-like VAE and an image-to-video transformer are refused."""
    src = Path(ckpts["tiny_cogvideox"])
    for kind, sub, change in (
        ("wan", "vae/config.json", {"_class_name": "AutoencoderKLWan"}),
        ("i2v", "transformer/config.json", {"in_channels": 32}),
    ):
        folder = tmp_path / kind
        for f in ("model_index.json", "transformer/config.json", "vae/config.json", "text_encoder/config.json",
                  "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json"):  # fmt: skip
            (folder / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / f, folder / f)
        config = json.loads((folder / sub).read_text())
        (folder / sub).write_text(json.dumps({**config, **change}))
        with pytest.raises(ConfigError, match="model.path"):
            SPEC.check_checkpoint(str(folder))


# ------------------------------------------------------------------------------------ attention


@pytest.mark.parametrize("name", VARIANTS)
def test_attention_processor_equals_diffusers(ckpts, name):
    """Our processor (SDPA kernel, and a query-sliced kernel) reproduces CogVideoXAttnProcessor2_0."""
    pipe = SPEC.load(tiny_cfg(name), ckpts[name])  # diffusers' own processors until install_attention
    transformer = pipe.transformer
    assert {type(p).__name__ for p in transformer.attn_processors.values()} == {"CogVideoXAttnProcessor2_0"}
    g = gen(1)
    x = torch.randn(2, 3, 16, 8, 12, generator=g)  # (B, T, C, h, w)
    text = torch.randn(2, 226, 4096, generator=g)
    t = torch.tensor([999, 500])
    rope = None
    if transformer.config.use_rotary_positional_embeddings:
        rope = pipe._prepare_rotary_positional_embeddings(64, 96, 3, torch.device("cpu"))

    def forward():
        with torch.no_grad():
            return transformer(x, text, t, image_rotary_emb=rope, return_dict=False)[0]

    expected = forward()
    calls = []

    def counting(q, k, v):
        calls.append(q.shape)
        return sdpa(q, k, v)

    SPEC.install_attention(pipe, counting)
    got = forward()
    assert len(calls) == transformer.config.num_layers
    assert calls[0] == (2, 2, 226 + 3 * 4 * 6, 16)  # (B, H, text + video tokens, D)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    SPEC.install_attention(pipe, sliced(sdpa, 100))
    torch.testing.assert_close(forward(), expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------ pipeline


@pytest.mark.parametrize("name", VARIANTS)
def test_pipeline_equals_diffusers(ckpts, name):
    """Default call, same checkpoint and seed: our pipeline gives diffusers' CogVideoXPipeline's video."""
    from diffusers import CogVideoXPipeline

    ref = CogVideoXPipeline.from_pretrained(ckpts[name], torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    expected = ref(**CALL, generator=gen(), output_type="np").frames
    got = load(ckpts, name)(**CALL, generator=gen(), output_type="np").frames
    assert got.shape == expected.shape == (1, 9, 64, 96, 3)
    assert np.abs(got - expected).max() <= 1e-5


@pytest.mark.parametrize("name", VARIANTS)
def test_batched_equals_sequential_guidance(pipes, name):
    pipe = pipes[name]
    batched = pipe(**CALL, generator=gen(), output_type="latent").frames
    seq = pipe(**CALL, generator=gen(), guidance_mode="sequential", output_type="latent").frames
    assert batched.shape == (1, 3, 16, 8, 12)  # (B, T, C, h, w)
    torch.testing.assert_close(seq, batched, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="guidance_mode"):
        pipe(**CALL, guidance_mode="both")


def test_stages_placement_and_cancellation(ckpts, latents_2b):
    pipe = load(ckpts, "tiny_cogvideox")
    stages = []

    class Stage:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            stages.append(self.name)

        def __exit__(self, *exc):
            return False

    pipe.execution_device = torch.device("cpu")  # as the backends set it
    pipe.text_encoder_placement = "cpu"
    got = pipe(**CALL, generator=gen(), output_type="np", stage_context=Stage).frames
    assert got.shape == (1, 9, 64, 96, 3)
    assert stages == ["text_encoding", "denoising", "decoding"]
    pipe.text_encoder_placement = "release"
    torch.testing.assert_close(pipe(**CALL, generator=gen(), output_type="latent").frames, latents_2b, rtol=0, atol=0)

    steps = []

    def stop(p, i, t, kwargs):
        steps.append(i)
        p._interrupt = True
        return kwargs

    with pytest.raises(GenerationCancelled, match="after step 1 of 2"):
        pipe(**CALL, generator=gen(), callback_on_step_end=stop)
    assert steps == [0]


def test_long_prompt_is_truncated_with_a_warning(pipes, caplog):
    pipe = pipes["tiny_cogvideox_5b"]
    long_prompt = " ".join(["cat"] * 300)  # "▁cat" is one token: 300 + </s>
    caplog.set_level(logging.WARNING, logger="contentv.models.cogvideox.pipeline")
    pipe(prompt=long_prompt, num_inference_steps=1, generator=gen(), output_type="latent")
    ours = [r.getMessage() for r in caplog.records if r.name == "contentv.models.cogvideox.pipeline"]
    assert len(ours) == 1 and "301 T5 tokens" in ours[0] and "226" in ours[0] and "truncated" in ours[0]
    caplog.clear()
    pipe(prompt="a cat", num_inference_steps=1, generator=gen(), output_type="latent")
    assert not [r for r in caplog.records if r.name == "contentv.models.cogvideox.pipeline"]


def test_sincos_model_needs_its_text_length(pipes):
    """2B-style positions have exactly 226 text slots; 5B-style RoPE takes other lengths."""
    with pytest.raises(ValueError, match="max_sequence_length=100"):
        pipes["tiny_cogvideox"](prompt="a cat", max_sequence_length=100)
    out = pipes["tiny_cogvideox_5b"](
        prompt="a cat", max_sequence_length=100, num_inference_steps=1, generator=gen(), output_type="latent"
    )
    assert out.frames.shape == (1, 3, 16, 8, 12)


# ------------------------------------------------------------------------------------ validation, configs


def run_cfg(**sampling) -> RunConfig:
    cfg = RunConfig()
    cfg.model = tiny_cfg("tiny_cogvideox")
    cfg.model.sampling_defaults = dict(
        height=64, width=96, num_frames=9, num_inference_steps=2, guidance_scale=6.0, fps=8
    )
    cfg.sampling = SamplingConfig(**{"prompt": "a cat", **sampling})
    return cfg


@pytest.mark.parametrize(
    "sampling, option",
    [
        (dict(num_frames=10), "sampling.num_frames"),  # not 4k+1
        (dict(num_frames=13), "sampling.num_frames"),  # 4 latent frames: the VAE would decode 16
        (dict(num_frames=0), "sampling.num_frames"),
        (dict(height=72), "sampling.height"),  # a multiple of 8, not of 16
        (dict(width=100), "sampling.width"),
        (dict(num_inference_steps=0), "sampling.num_inference_steps"),
        (dict(prompt="   "), "sampling.prompt"),
        (dict(max_sequence_length=227), "sampling.max_sequence_length"),
    ],
)
def test_bad_settings_fail_before_loading(sampling, option, monkeypatch):
    from backends import build_backend
    from contentv.config import BackendConfig
    from contentv.runtime import Runtime

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(CogVideoXRuntimePipeline, "from_pretrained", refuse)
    cfg = run_cfg(**sampling)
    with pytest.raises(ConfigError) as err:
        Runtime(build_backend(BackendConfig(name="cpu"))).generate(cfg)
    assert err.value.option == option


@pytest.mark.parametrize("frames", [1, 9, 17, 49, 81])
def test_good_frame_counts(frames):
    SPEC.validate(resolve_sampling(run_cfg(num_frames=frames).sampling, run_cfg().model))


@pytest.mark.parametrize("name", ["cogvideox_2b", "cogvideox_5b", *VARIANTS])
def test_model_yaml_defaults_are_valid(name):
    data = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml"))
    model = ModelConfig(**data)
    assert model.name == name and model.family == "cogvideox"
    sampling = resolve_sampling(SamplingConfig(prompt="a cat"), model)
    SPEC.validate(sampling)
    assert sampling.max_sequence_length == 226 and sampling.negative_prompt == ""
    if not model.tiny:  # the model card's defaults
        assert (sampling.width, sampling.height, sampling.num_frames, sampling.fps) == (720, 480, 49, 8)
        assert (sampling.num_inference_steps, sampling.guidance_scale) == (50, 6.0)
        assert model.dtype == {"cogvideox_2b": "float16", "cogvideox_5b": "bfloat16"}[name]
        assert model.path == {"cogvideox_2b": "THUDM/CogVideoX-2b", "cogvideox_5b": "THUDM/CogVideoX-5b"}[name]
        SPEC.check_checkpoint(SPEC.resolve_path(model))  # a hub id: nothing to read, no network


# ------------------------------------------------------------------------------------ memory options


@pytest.fixture(scope="module")
def latents_2b(pipes) -> torch.Tensor:
    """Final latents of CALL on the 2B-style tiny model, everything resident."""
    return pipes["tiny_cogvideox"](**CALL, generator=gen(), output_type="latent").frames


def prepared(ckpts, memory: MemoryConfig) -> CogVideoXRuntimePipeline:
    from backends import build_backend
    from contentv.config import BackendConfig

    pipe = SPEC.load(tiny_cfg("tiny_cogvideox"), ckpts["tiny_cogvideox"])
    pipe.set_progress_bar_config(disable=True)
    build_backend(BackendConfig(name="cpu")).prepare(pipe, memory, SPEC)
    return pipe


@pytest.mark.parametrize(
    "memory",
    [
        MemoryConfig(attention_slicing=50),
        MemoryConfig(text_encoders="cpu"),
        MemoryConfig(group_offload=True, text_encoders="auto"),
        MemoryConfig(model_cpu_offload=True, text_encoders="auto"),
    ],
    ids=["attention_slicing", "text_encoders_cpu", "group_offload", "model_cpu_offload"],
)
def test_memory_options_keep_the_output(ckpts, latents_2b, memory):
    got = prepared(ckpts, memory)(**CALL, generator=gen(), output_type="latent").frames
    torch.testing.assert_close(got, latents_2b, rtol=0, atol=1e-6)


def test_vae_tiling_decodes_in_tiles(ckpts, latents_2b):
    pipe = prepared(ckpts, MemoryConfig(vae_tiling=True))
    tiles = []
    pipe.vae.decoder.register_forward_hook(lambda m, args, out: tiles.append(args[0].shape[-2:]))
    with torch.no_grad():
        video = pipe.decode_latents(latents_2b)  # (B, 3, F, H, W)
    assert video.shape == (1, 3, 9, 64, 96)  # tiles blended back to the full size
    assert max(s[0] for s in tiles) < 8 and max(s[1] for s in tiles) < 12  # (h, w) of each latent tile


# ------------------------------------------------------------------------------------ demo.py end to end


@pytest.fixture(scope="module")
def demo_runs(ckpts, cache_dir, tmp_path_factory):
    """Both tiny variants through demo.py, run side by side (checkpoints already built in the shared cache)."""
    env = demo_env(cache_dir)
    runs = {}
    for name in VARIANTS:
        out = tmp_path_factory.mktemp(name)
        cmd = [sys.executable, "demo.py", f"model={name}", "backend=cpu", f"hydra.run.dir={out}"]
        runs[name] = (out, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = {}
    for name, (out, proc) in runs.items():
        stdout, stderr = proc.communicate(timeout=300)
        results[name] = (proc.returncode, stdout.decode(), stderr.decode(), out)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", VARIANTS)
def test_demo_writes_video_and_sidecar(demo_runs, name):
    rc, stdout, stderr, out = demo_runs[name]
    assert rc == 0, stderr[-3000:]
    videos, sidecars = list(out.glob("*.mp4")), list(out.glob("*.json"))
    assert len(videos) == 1 and len(sidecars) == 1 and videos[0].stat().st_size > 0
    record = json.loads(sidecars[0].read_text())
    assert record["config"]["model"]["name"] == name
    assert record["config"]["sampling"]["num_frames"] == 9
    assert record["video"] == videos[0].name


@pytest.mark.parametrize(
    "name,length,ok",
    [("tiny_cogvideox", 226, True), ("tiny_cogvideox", 128, False), ("tiny_cogvideox_5b", 128, True)],
)
def test_text_length_is_checked_against_the_architecture_before_loading(name, length, ok):
    from contentv.config import ModelConfig, RunConfig, SamplingConfig
    from contentv.validation import validate_run

    cfg = RunConfig(
        model=ModelConfig(
            name=name,
            family="cogvideox",
            path=None,
            tiny=True,
            dtype="float32",
            sampling_defaults={
                "height": 64,
                "width": 96,
                "num_frames": 9,
                "num_inference_steps": 1,
                "guidance_scale": 6.0,
                "fps": 8,
            },
        ),
        sampling=SamplingConfig(prompt="a cat", max_sequence_length=length),
    )
    if ok:
        validate_run(cfg)
    else:
        with pytest.raises(ConfigError, match="sampling.max_sequence_length=128"):
            validate_run(cfg)
