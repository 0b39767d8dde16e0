"""The Python API: tiny_checkpoint, RunConfig from the CLI's presets, diffusers' argument order, README's snippets."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import contentv
import demo
from contentv.config import resolve_sampling
from contentv.models.cogvideox.pipeline import CogVideoXRuntimePipeline
from contentv.models.contentv.pipeline import ContentVPipeline
from contentv.registry import FAMILIES, get_spec

ROOT = Path(__file__).resolve().parents[1]
TINY = ("tiny_contentv", "tiny_cogvideox", "tiny_cogvideox_5b")
PIPELINES = {"tiny_contentv": ContentVPipeline, "tiny_cogvideox": CogVideoXRuntimePipeline}
PIPELINES["tiny_cogvideox_5b"] = CogVideoXRuntimePipeline


# ------------------------------------------------------------------ tiny_checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_tiny_checkpoint_builds_once_and_loads(cache_dir, name):
    path = contentv.tiny_checkpoint(name)
    assert Path(path).parent == cache_dir / "tiny" and Path(path).name.startswith(f"{name}-")
    assert (Path(path) / "model_index.json").is_file()
    assert contentv.tiny_checkpoint(name) == path  # cached: the same folder, not rebuilt
    # The folder the command line uses for model=<name> (same preset, same seed).
    cfg = demo.load_config([f"model={name}"]).model
    assert get_spec(cfg.family).resolve_path(cfg) == path
    pipe = PIPELINES[name].from_pretrained(path, torch_dtype=torch.float32)
    assert pipe.transformer is not None and pipe.vae is not None


def test_tiny_checkpoint_seed_is_part_of_the_folder(cache_dir):
    assert contentv.tiny_checkpoint("tiny_contentv", seed=1) != contentv.tiny_checkpoint("tiny_contentv")


def test_tiny_checkpoint_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="one of: tiny_contentv, tiny_cogvideox, tiny_cogvideox_5b"):
        contentv.tiny_checkpoint("tiny_wan")


def test_every_tiny_preset_has_a_builder():
    """Each conf/model/*.yaml with tiny: true is a name tiny_checkpoint accepts, and nothing else is."""
    presets = {p.stem for p in (ROOT / "conf" / "model").glob("*.yaml") if OmegaConf.load(p).get("tiny")}
    names = {n for family in FAMILIES for n in get_spec(family).tiny_names}
    assert presets == names == set(TINY)


def test_public_names():
    for name in contentv.__all__:
        assert getattr(contentv, name) is not None
    assert contentv.ContentVPipeline is ContentVPipeline
    with pytest.raises(AttributeError):
        contentv.no_such_name  # noqa: B018


# ------------------------------------------------------------------ RunConfig from the presets


@pytest.mark.parametrize(
    "preset,expected",
    [
        ("tiny_contentv", (64, 96, 13, 4, 8)),
        ("tiny_cogvideox", (64, 96, 9, 4, 8)),
        ("contentv_8b", (432, 768, 125, 50, 24)),
        ("cogvideox_5b", (480, 720, 49, 50, 8)),
    ],
)
def test_load_config_gives_the_presets_sampling_defaults(preset, expected):
    cfg = demo.load_config([f"model={preset}", "backend=cpu", "sampling.prompt=a red fox, walking in snow"])
    s = resolve_sampling(cfg.sampling, cfg.model)
    assert (s.height, s.width, s.num_frames, s.num_inference_steps, s.fps) == expected
    assert s.prompt == "a red fox, walking in snow" and cfg.backend.name == "cpu"


def test_load_config_reports_a_bad_option_by_name():
    with pytest.raises(demo.UsageError, match="model='tiny' is not valid: one of: .*tiny_contentv"):
        demo.load_config(["model=tiny"])


# ------------------------------------------------------------------ diffusers' argument order

# bytedance/ContentV contentv_pipeline.py, ContentVPipeline.__call__ (diffusers' SD3 order, num_frames after width).
REFERENCE_CONTENTV = [
    "prompt",
    "prompt_2",
    "prompt_3",
    "height",
    "width",
    "num_frames",
    "num_inference_steps",
    "guidance_scale",
    "negative_prompt",
    "negative_prompt_2",
    "negative_prompt_3",
    "num_videos_per_prompt",
    "generator",
    "latents",
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
    "output_type",
    "return_dict",
    "joint_attention_kwargs",
    "clip_skip",
    "callback_on_step_end",
    "callback_on_step_end_tensor_inputs",
    "max_sequence_length",
]


def positional(fn) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds and p.name != "self"]


def keyword_only(fn) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind == inspect.Parameter.KEYWORD_ONLY]


def diffusers_pipelines():
    from diffusers import CogVideoXPipeline, StableDiffusion3Pipeline

    return [(ContentVPipeline, StableDiffusion3Pipeline), (CogVideoXRuntimePipeline, CogVideoXPipeline)]


@pytest.mark.parametrize("ours,theirs", diffusers_pipelines(), ids=["contentv-sd3", "cogvideox"])
def test_arguments_shared_with_diffusers_keep_its_order(ours, theirs):
    mine, upstream = positional(ours.__call__), positional(theirs.__call__)
    shared = [n for n in upstream if n in mine]
    assert [n for n in mine if n in shared] == shared
    assert len(shared) >= 20  # prompt, height, width, steps, guidance, negative prompt, generator, latents, ...
    # Every argument diffusers has is positional with us too; only this runtime's own are keyword-only.
    assert keyword_only(ours.__call__) == ["guidance_mode", "stage_context"]


def test_cogvideox_positional_arguments_are_diffusers_exactly():
    from diffusers import CogVideoXPipeline

    assert positional(CogVideoXRuntimePipeline.__call__) == positional(CogVideoXPipeline.__call__)


def test_contentv_positional_arguments_are_the_reference_exactly():
    assert positional(ContentVPipeline.__call__) == REFERENCE_CONTENTV


@pytest.mark.slow
def test_second_positional_argument_is_prompt_2(tiny_pipe):
    """pipe(prompt, X): X reaches CLIP-G as prompt_2 (diffusers and the reference), not the negative prompt."""
    small = dict(num_frames=5, num_inference_steps=1, output_type="latent", guidance_mode="sequential")

    def run(*args, **kwargs):
        return tiny_pipe(*args, **small, **kwargs, generator=torch.Generator().manual_seed(0)).frames

    # (prompt, prompt_2, prompt_3, height, width) by position, as diffusers' StableDiffusion3Pipeline takes them.
    by_position = run("a red fox", "a cat", None, 32, 48)
    assert torch.equal(by_position, run("a red fox", prompt_2="a cat", height=32, width=48))
    assert not torch.equal(by_position, run("a red fox", height=32, width=48))  # prompt_2 changes the result


# ------------------------------------------------------------------ README's snippets


def readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## From Python\n") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_from_python_has_both_snippets():
    blocks = readme_python_blocks()
    assert len(blocks) == 2
    assert "contentv.tiny_checkpoint(" in blocks[0] and "from contentv_cli import load_config" in blocks[1]


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1], ids=["pipeline", "runtime"])
def test_readme_from_python_snippets_run(cache_dir, tmp_path, monkeypatch, index):
    """Each ```python block of README's "From Python" section, run as written (the run writes under cwd)."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_python_blocks()[index], f"README.md From Python block {index}", "exec"), namespace)
    if index == 0:
        assert namespace["frames"].shape == (13, 64, 96, 3)
    else:
        video = Path(namespace["result"].video)
        assert video.is_file() and video.resolve().is_relative_to(tmp_path.resolve() / "outputs")
