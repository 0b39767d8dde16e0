"""The server's rules without a server: size and seconds to frames, a request to a run, one worker per device."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from contentv.config import BackendConfig, MemoryConfig, ModelConfig, Presets, RunConfig
from contentv.errors import ConfigError
from contentv.serve import sizes
from contentv.serve.admit import Admission
from contentv.serve.workers import devices, exit_reason, run_from_dict


@pytest.mark.parametrize(
    "seconds,fps,multiple,frames",
    [
        (5, 24, 4, 121),  # ContentV at its 24 fps: 120 -> 4k+1
        (0.5, 8, 4, 5),
        (0.01, 8, 4, 5),  # at least one step of the form
        (6, 8, 8, 49),  # CogVideoX: 8k+1 (its model card's 49 frames at 8 fps)
        (1.6, 8, 8, 17),  # 12.8 frames -> nearest 8k (16) + 1
        (1.4, 8, 8, 9),  # 11.2 -> 8 + 1
    ],
)
def test_seconds_round_to_the_models_frame_form(seconds, fps, multiple, frames):
    assert sizes.frames_for(seconds, fps, multiple) == frames
    assert (frames - 1) % multiple == 0


def test_size_and_seconds_are_checked():
    assert sizes.parse_size("1280x720") == (720, 1280)
    for bad in ("720p", "0x", "12x12x3", ""):
        with pytest.raises(ConfigError, match="^size="):
            sizes.parse_size(bad)
    for bad in ("0", "-1", "nan", "inf", "four", "7200"):
        with pytest.raises(ConfigError, match="^seconds="):
            sizes.parse_seconds(bad)
    assert sizes.seconds_of(5, 8) == "0.625" and sizes.seconds_of(121, 24) == "5.042"


def presets() -> Presets:
    tiny = ModelConfig(name="tiny_contentv", family="contentv", path=None, tiny=True, dtype="float32")
    cog = ModelConfig(name="tiny_cogvideox", family="cogvideox", path=None, tiny=True, dtype="float32")
    cog.sampling_defaults = {"fps": 8}
    memories = {"none": MemoryConfig(name="none"), "int8": MemoryConfig(name="int8", quantization="bnb_int8")}
    return Presets(models={"tiny_contentv": tiny, "tiny_cogvideox": cog}, memories=memories)


def admission(tmp_path: Path, **serve) -> Admission:
    base = RunConfig(model=presets().models["tiny_contentv"], backend=BackendConfig(name="cpu"))
    base.sampling.num_inference_steps = 1  # the server's own setting
    base.serve = dataclasses.replace(base.serve, **serve)
    return Admission(base, presets(), tmp_path)


def test_a_request_becomes_the_servers_run_with_the_requests_fields(tmp_path):
    a = admission(tmp_path, models=["tiny_contentv", "tiny_cogvideox"])
    run = a.build({"model": "tiny_cogvideox", "prompt": "a cat", "size": "48x32", "seconds": "1.6", "seed": "7"}, "v1")
    assert run.model.name == "tiny_cogvideox" and run.mode == "generate"
    assert (run.sampling.height, run.sampling.width, run.sampling.num_frames) == (32, 48, 17)
    assert run.sampling.seed == 7 and run.sampling.num_inference_steps is None  # another model: its defaults
    assert run.output.dir == str(tmp_path) and run.output.name == "v1"  # the server's folder, the job's name
    same = a.build({"prompt": "a dog"}, "v2")
    assert same.model.name == "tiny_contentv" and same.sampling.num_inference_steps == 1
    assert run_from_dict(dataclasses.asdict(run)) == run  # what the worker rebuilds from the stored job


@pytest.mark.parametrize(
    "fields,option",
    [
        ({"model": "tiny_cogvideox"}, "model"),  # a preset, but not among serve.models
        ({"memory": "int8"}, "memory"),  # not among serve.memory_presets
        ({"output_dir": "/tmp"}, "output_dir"),
        ({"seed": "x"}, "sampling.seed"),
        ({"prompt": "x" * 101}, "prompt"),
    ],
)
def test_what_a_request_may_not_set(tmp_path, fields, option):
    with pytest.raises(ConfigError) as err:
        admission(tmp_path, max_prompt_chars=100).build({"prompt": "a cat", **fields}, "v1")
    assert err.value.option == option


def test_memory_presets_the_server_allows(tmp_path):
    run = admission(tmp_path, memory_presets=["int8"]).build({"prompt": "a", "memory": "int8"}, "v1")
    assert run.memory.quantization == "bnb_int8"
    with pytest.raises(ConfigError, match="serve.memory_presets"):
        admission(tmp_path, memory_presets=["fast"])


class FakeBackend:
    def __init__(self, cfg: BackendConfig):
        self.name = "cuda" if cfg.name == "auto" else cfg.name
        self.device = torch.device("cuda" if self.name == "cuda" else "cpu", 0)


def test_one_worker_per_visible_accelerator_or_listed_device(monkeypatch):
    listed = devices(["cuda:1", "cuda:3"], BackendConfig(name="auto", attention="sdpa"), FakeBackend)
    assert [(b.name, b.device_index, b.attention) for b in listed] == [("cuda", 1, "sdpa"), ("cuda", 3, "sdpa")]
    with pytest.raises(ConfigError, match=r"serve.devices\[0\]"):
        devices(["CUDA 1"], BackendConfig(), FakeBackend)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 4)
    found = devices(None, BackendConfig(name="auto"), FakeBackend)
    assert [(b.name, b.device_index) for b in found] == [("cuda", i) for i in range(4)]
    assert [b.name for b in devices(None, BackendConfig(name="cpu"), FakeBackend)] == ["cpu"]  # one on the CPU


def test_exit_reasons_name_the_signal():
    assert exit_reason(-9) == "was killed by SIGKILL" and exit_reason(1) == "exited with status 1"
