"""diffusers' pipeline habits on both families: from_pretrained's arguments, save/load round trips, the errors
diffusers raises, and calls that return what was asked.

Our own tests of the behaviours diffusers' pipeline test suite (tests/pipelines/.../test_cogvideox.py, its
PipelineTesterMixin) checks, not a copy of it: the sdist on PyPI ships no tests and CI reaches no other network,
so each behaviour is written here against the tiny checkpoints (built offline).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline

import contentv
from contentv.checkpoint import CheckpointError
from contentv.models.cogvideox.pipeline import CogVideoXRuntimePipeline
from contentv.models.contentv.pipeline import ContentVPipeline

# Tiny and quick: 32x48, 9 frames (3 latent frames), 1 step.
COG_CALL = dict(prompt="a red fox", height=32, width=48, num_frames=9, num_inference_steps=1, output_type="pt")
CV_CALL = dict(prompt="a red fox", height=32, width=48, num_frames=5, num_inference_steps=1, output_type="pt")
FAMILIES = {
    "cogvideox": (CogVideoXRuntimePipeline, "tiny_cogvideox", COG_CALL),
    "contentv": (ContentVPipeline, "tiny_contentv", CV_CALL),
}


@pytest.fixture(scope="module")
def ckpt(cache_dir):
    return {family: contentv.tiny_checkpoint(name) for family, (_, name, _) in FAMILIES.items()}


@pytest.fixture(scope="module")
def pipes(ckpt, single_thread):
    out = {}
    for family, (cls, _, _) in FAMILIES.items():
        out[family] = cls.from_pretrained(ckpt[family])
        out[family].set_progress_bar_config(disable=True)
    return out


def generate(pipe, call: dict, **changes) -> torch.Tensor:
    return pipe(**{**call, **changes}, generator=torch.Generator().manual_seed(0)).frames


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


# ------------------------------------------------------------------------------------------ from_pretrained's arguments


@pytest.mark.parametrize("family", FAMILIES)
def test_variant_round_trip(family, pipes, tmp_path):
    cls = FAMILIES[family][0]
    pipes[family].save_pretrained(tmp_path, variant="fp16")
    assert list((tmp_path / "transformer").glob("*.fp16.safetensors"))
    loaded = cls.from_pretrained(tmp_path, variant="fp16")
    assert same_weights(loaded.transformer, pipes[family].transformer)
    assert same_weights(loaded.vae, pipes[family].vae)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_variant_the_folder_lacks_is_diffusers_value_error(family, ckpt):
    with pytest.raises(ValueError, match=r"You are trying to load the model files of the `variant=fp16`"):
        FAMILIES[family][0].from_pretrained(ckpt[family], variant="fp16")


def test_torch_dtype_per_component_as_diffusers_takes_it(ckpt):
    dtypes = {"transformer": torch.bfloat16, "default": torch.float16}
    pipe = CogVideoXRuntimePipeline.from_pretrained(ckpt["cogvideox"], torch_dtype=dtypes)
    got = {n: m.dtype for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    assert got == {"transformer": torch.bfloat16, "vae": torch.float16, "text_encoder": torch.float16}
    # diffusers 0.42 spells it dtype=; the explicit per-component arguments still win.
    pipe = CogVideoXRuntimePipeline.from_pretrained(ckpt["cogvideox"], dtype=dtypes, vae_dtype=torch.float32)
    assert (pipe.transformer.dtype, pipe.vae.dtype) == (torch.bfloat16, torch.float32)


def test_contentv_dtype_dict_keeps_its_fp32_vae_unless_named(ckpt):
    pipe = ContentVPipeline.from_pretrained(ckpt["contentv"], torch_dtype={"default": torch.bfloat16})
    assert (pipe.transformer.dtype, pipe.text_encoder_3.dtype, pipe.vae.dtype) == (torch.bfloat16,) * 2 + (
        torch.float32,
    )
    pipe = ContentVPipeline.from_pretrained(ckpt["contentv"], torch_dtype={"vae": torch.bfloat16})
    assert (pipe.transformer.dtype, pipe.vae.dtype) == (torch.float32, torch.bfloat16)


def test_a_misspelt_component_in_the_dtype_dict_is_refused(ckpt):
    with pytest.raises(ValueError, match=r"torch_dtype: no component 'transfomer'; keys are .*transformer"):
        CogVideoXRuntimePipeline.from_pretrained(ckpt["cogvideox"], torch_dtype={"transfomer": torch.float16})


def test_diffusers_hub_and_placement_arguments_are_taken(ckpt):
    pipe = CogVideoXRuntimePipeline.from_pretrained(
        ckpt["cogvideox"],
        cache_dir=None,
        force_download=False,
        proxies=None,
        local_files_only=True,
        low_cpu_mem_usage=True,
        device_map="cpu",
        use_safetensors=True,
    )
    assert pipe.transformer.device.type == "cpu"


@pytest.mark.parametrize(
    "kwargs,error,words",
    [
        (
            {"use_safetensors": False},
            ValueError,
            "use_safetensors=False: .*safetensors only.*contentv.checkpoint convert",
        ),
        ({"quantization_config": object()}, ValueError, "quantization_config: not taken by .*memory.quantization"),
        ({"custom_pipeline": "x"}, ValueError, "custom_pipeline: not taken by .*no code from a checkpoint"),
        ({"no_such_argument": 1}, TypeError, "unexpected arguments: no_such_argument"),
    ],
)
def test_refused_arguments_say_why(ckpt, kwargs, error, words):
    with pytest.raises(error, match=words) as info:
        CogVideoXRuntimePipeline.from_pretrained(ckpt["cogvideox"], **kwargs)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ save and load


def test_a_pipeline_with_diffusers_ddim_saves_and_loads_again(pipes, tmp_path):
    pipe = pipes["cogvideox"]
    ddim = CogVideoXRuntimePipeline(
        **{**pipe.components, "scheduler": DDIMScheduler.from_config(pipe.scheduler.config)}
    )
    ddim.set_progress_bar_config(disable=True)
    expected = generate(ddim, COG_CALL)
    ddim.save_pretrained(tmp_path)
    loaded = CogVideoXRuntimePipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is DDIMScheduler
    assert torch.allclose(generate(loaded, COG_CALL), expected, atol=1e-5)


def test_a_saved_folder_loads_with_diffusionpipeline(pipes, tmp_path):
    pipes["cogvideox"].save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "CogVideoXPipeline"
    theirs = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(theirs).__name__ == "CogVideoXPipeline"
    assert same_weights(theirs.transformer, pipes["cogvideox"].transformer)


@pytest.mark.parametrize("family", FAMILIES)
def test_missing_weights_are_an_oserror_naming_the_component(family, ckpt, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(ckpt[family], folder)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(OSError, match=r"vae: .*diffusion_pytorch_model\.safetensors") as info:
        FAMILIES[family][0].from_pretrained(folder)
    assert isinstance(info.value, CheckpointError)  # and still the runtime's one-line ValueError
    assert "\n" not in str(info.value)


def test_pickle_weights_are_refused_with_the_command_that_converts_them(pipes, tmp_path):
    pipes["cogvideox"].save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "vae" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(OSError, match=r"only pickle weights .*python -m contentv\.checkpoint convert .*vae"):
        CogVideoXRuntimePipeline.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------ what a call returns


@pytest.mark.parametrize("num_frames", [13, 5, 12])
def test_cogvideox_refuses_frame_counts_it_would_not_return(pipes, num_frames):
    with pytest.raises(ValueError, match=rf"num_frames={num_frames} is not valid: of the form 8k\+1") as info:
        generate(pipes["cogvideox"], COG_CALL, num_frames=num_frames)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("num_frames", [1, 8, 9])
def test_cogvideox_returns_the_frames_asked_for(pipes, num_frames):
    assert generate(pipes["cogvideox"], COG_CALL, num_frames=num_frames).shape[1] == num_frames


@pytest.mark.parametrize("family", FAMILIES)
def test_num_videos_per_prompt_is_honoured(family, pipes):
    call = FAMILIES[family][2]
    frames = generate(pipes[family], call, prompt=["a red fox", "a cat"], num_videos_per_prompt=2)
    assert frames.shape[0] == 4
    assert not torch.equal(frames[0], frames[1])  # different noise per video


def test_num_videos_per_prompt_with_prompt_embeddings(pipes):
    pipe = pipes["cogvideox"]
    embeds, negative = pipe.encode_prompt("a red fox", "", True, device=torch.device("cpu"))
    call = {k: v for k, v in COG_CALL.items() if k != "prompt"}
    frames = generate(pipe, call, prompt_embeds=embeds, negative_prompt_embeds=negative, num_videos_per_prompt=2)
    assert frames.shape[0] == 2


def test_output_is_unchanged_by_a_save_and_load(pipes, tmp_path):
    expected = generate(pipes["contentv"], CV_CALL)
    pipes["contentv"].save_pretrained(tmp_path)
    loaded = ContentVPipeline.from_pretrained(Path(tmp_path))
    loaded.set_progress_bar_config(disable=True)
    assert torch.allclose(generate(loaded, CV_CALL), expected, atol=1e-5)


def test_prompt_embeddings_from_a_text_encoder_only_pipeline_give_the_same_video(pipes):
    """diffusers' "encode_prompt works in isolation": encode with one pipeline, denoise with another that has no
    text encoder or tokenizer."""
    full = pipes["cogvideox"]
    encoder = CogVideoXRuntimePipeline(**{**full.components, "transformer": None, "vae": None})
    embeds, negative = encoder.encode_prompt("a red fox", "", True, device=torch.device("cpu"))
    denoiser = CogVideoXRuntimePipeline(**{**full.components, "text_encoder": None, "tokenizer": None})
    denoiser.set_progress_bar_config(disable=True)
    call = {k: v for k, v in COG_CALL.items() if k != "prompt"}
    frames = generate(denoiser, call, prompt_embeds=embeds, negative_prompt_embeds=negative)
    assert torch.allclose(frames, generate(full, COG_CALL, negative_prompt=""), atol=1e-6)


def test_the_command_line_loads_a_folder_saved_with_another_diffusers_scheduler(tmp_path, cache_dir):
    """A CogVideoX folder the Python API saved with DDIMScheduler passes the command line's checkpoint check (any
    diffusers scheduler), and one naming a class diffusers doesn't have is still refused."""
    import json
    import shutil

    import contentv
    from contentv.errors import ConfigError
    from contentv.models.cogvideox import SPEC

    folder = tmp_path / "ckpt"
    shutil.copytree(contentv.tiny_checkpoint("tiny_cogvideox"), folder)
    config = folder / "scheduler" / "scheduler_config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "_class_name": "DDIMScheduler"}))
    SPEC.check_checkpoint(str(folder))
    config.write_text(json.dumps({**data, "_class_name": "NoSuchScheduler"}))
    with pytest.raises(ConfigError, match="NoSuchScheduler"):
        SPEC.check_checkpoint(str(folder))
