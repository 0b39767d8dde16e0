"""Every config option composes, every field is overridable, and library code works without Hydra."""

from __future__ import annotations

import dataclasses

import pytest

import demo
from contentv.config import MemoryConfig, ModelConfig, RunConfig, SamplingConfig, resolve_sampling
from contentv.errors import ConfigError
from contentv.validation import validate_run


def composed(overrides: list[str]) -> RunConfig:
    return demo.load_config(overrides)


OPTIONS = [(g, o) for g in demo.GROUPS for o in demo.group_options(g)]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_into_typed_config(group, option):
    cfg = composed([f"{group}={option}"])
    assert isinstance(cfg, RunConfig)
    node = getattr(cfg, group)
    if hasattr(node, "name") and group in ("model", "memory"):
        assert node.name == option  # name <-> file <-> registry key
    if group == "backend":
        assert node.name == option


def test_defaults_are_the_reference_demo():
    cfg = composed([])
    s = resolve_sampling(cfg.sampling, cfg.model)
    assert (s.height, s.width, s.num_frames, s.num_inference_steps, s.guidance_scale, s.fps, s.seed) == (
        432,
        768,
        125,
        50,
        6.0,
        24,
        42,
    )
    assert s.negative_prompt.startswith("overexposed, low quality, deformation")
    assert cfg.model.path == "ByteDance/ContentV-8B" and cfg.model.vae_dtype == "float32"
    # Python users without Hydra get the same defaults from the dataclasses.
    assert resolve_sampling(SamplingConfig(), ModelConfig()) == dataclasses.replace(s, prompt=None)


def sample_value(f: dataclasses.Field, current):
    """A command-line text for the field and the value it must produce, by the field's declared type."""
    kind = str(f.type)
    if kind.startswith("bool"):
        return ("false", False) if current else ("true", True)
    if kind.startswith("int"):
        return str((current or 0) + 16), (current or 0) + 16
    if kind.startswith("float"):
        return str((current or 0.0) + 0.5), (current or 0.0) + 0.5
    if kind.startswith("list"):
        return "[text_encoder]", ["text_encoder"]
    if kind.startswith("dict"):
        return None, None
    return "xyz", "xyz"


FIELDS = [
    (group, f)
    for group, cls in (("sampling", SamplingConfig), ("memory", MemoryConfig), ("model", ModelConfig))
    for f in dataclasses.fields(cls)
]


@pytest.mark.parametrize("group,f", FIELDS, ids=[f"{g}.{f.name}" for g, f in FIELDS])
def test_every_field_can_be_overridden(group, f):
    base = getattr(composed([]), group)
    current = getattr(base, f.name)
    text, value = sample_value(f, current)
    if text is None:  # a dict field is overridden per key (added with + where the preset doesn't set it)
        prefix = "" if "height" in current else "+"
        cfg = composed([f"{prefix}{group}.{f.name}.height=80"])
        assert getattr(getattr(cfg, group), f.name)["height"] == 80
        return
    cfg = composed([f"{group}.{f.name}={text}"])
    assert getattr(getattr(cfg, group), f.name) == value


def test_sampling_defaults_keys_are_checked():
    model = ModelConfig(sampling_defaults={"heigth": 64})
    with pytest.raises(ConfigError, match="model.sampling_defaults.heigth"):
        resolve_sampling(SamplingConfig(), model)


def test_python_users_need_no_hydra(tmp_path):
    cfg = RunConfig()
    cfg.model = ModelConfig(
        name="tiny_contentv",
        path=None,
        tiny=True,
        dtype="float32",
        sampling_defaults={
            "height": 32,
            "width": 48,
            "num_frames": 5,
            "num_inference_steps": 1,
            "guidance_scale": 6.0,
            "fps": 8,
        },
    )
    cfg.sampling.prompt = "a cat"
    cfg.output.dir = str(tmp_path)
    checked = validate_run(cfg)
    assert checked.spec.family == "contentv" and checked.sampling.num_frames == 5 and list(checked.prompts) == ["a cat"]


def test_each_family_brings_its_own_published_defaults():
    """A ModelConfig built in Python gets its family's defaults, not ContentV-8B's (CogVideoX: the model card)."""
    cog = resolve_sampling(SamplingConfig(), ModelConfig(name="cogvideox_5b", family="cogvideox", path="x/y"))
    assert (cog.height, cog.width, cog.num_frames, cog.fps, cog.max_sequence_length) == (480, 720, 49, 8, 226)
    # a preset overrides only what it sets; sampling.<field> overrides both
    tiny = resolve_sampling(SamplingConfig(num_frames=17), ModelConfig(sampling_defaults={"height": 64}))
    assert (tiny.height, tiny.width, tiny.num_frames) == (64, 768, 17)
