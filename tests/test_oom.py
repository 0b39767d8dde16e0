"""Out of device memory during a run: memory=auto retries once with a lighter strategy; a pinned strategy stops
with one line naming the planner's suggestion. The device's out-of-memory error is raised from a hook on the
transformer whenever it would run with every weight resident (as a too-small GPU would)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import demo
from backends import build_backend
from contentv import _diffusers
from contentv.config import BackendConfig, RunConfig, SamplingConfig
from contentv.errors import OutOfMemory
from contentv.models.contentv.transformer import SD3Transformer3DModel
from contentv.runtime import Runtime

PRESETS = demo.load_presets(("model", "memory"))


@pytest.fixture
def resident_runs_out_of_memory(monkeypatch):
    """torch.OutOfMemoryError from the transformer's forward unless it is offloaded (a device too small for it)."""
    calls = {"raised": 0}
    forward = SD3Transformer3DModel.forward

    def small_device(self, *args, **kwargs):
        if not hasattr(self, "_hf_hook") and not _diffusers.is_group_offloaded(self):
            calls["raised"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (stand-in)")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(SD3Transformer3DModel, "forward", small_device)
    return calls


def run_config(tmp_path, memory: str) -> RunConfig:
    cfg = RunConfig(model=copy.deepcopy(PRESETS.models["tiny_contentv"]), backend=BackendConfig(name="cpu"))
    cfg.memory = copy.deepcopy(PRESETS.memories[memory])
    cfg.sampling = SamplingConfig(prompt="a red fox", height=32, width=48, num_frames=5, num_inference_steps=1)
    cfg.output.dir = str(tmp_path)
    return cfg


def test_auto_retries_once_with_a_lighter_strategy_and_records_it(cache_dir, tmp_path, resident_runs_out_of_memory):
    runtime = Runtime(build_backend(BackendConfig(name="cpu")), presets=PRESETS.memories)
    result = runtime.run(run_config(tmp_path, "auto"))
    fallback = result.prepared["memory_fallback"]
    assert fallback["from"] == "none" and fallback["to"] != "none" and "out of memory" in fallback["error"]
    assert resident_runs_out_of_memory["raised"] == 1
    record = json.loads(result.sidecar.read_text())
    assert record["prepared"]["memory_fallback"] == fallback
    assert record["config"]["memory"]["name"] == fallback["to"]  # the sidecar says what ran
    ran = record["config"]["memory"]
    assert ran["model_cpu_offload"] or ran["sequential_cpu_offload"] or ran["group_offload"]


def test_a_pinned_strategy_stops_with_the_planners_suggestion(cache_dir, tmp_path, resident_runs_out_of_memory):
    runtime = Runtime(build_backend(BackendConfig(name="cpu")), presets=PRESETS.memories)
    with pytest.raises(OutOfMemory) as err:
        runtime.run(run_config(tmp_path, "none"))
    text = str(err.value)
    assert text.startswith("out of memory on cpu with memory=none; the planner suggests memory=")
    assert "run again with memory=" in text and "\n" not in text
    assert not list(tmp_path.iterdir())  # nothing written
    assert runtime._pipe is None  # the device memory was given back


def test_a_second_out_of_memory_stops(cache_dir, tmp_path, monkeypatch):
    def always(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")

    monkeypatch.setattr(SD3Transformer3DModel, "forward", always)
    runtime = Runtime(build_backend(BackendConfig(name="cpu")), presets=PRESETS.memories)
    with pytest.raises(OutOfMemory, match=r"with memory=none and again with memory=\w+ .*fewer frames"):
        runtime.run(run_config(tmp_path, "auto"))
