"""One resolved run: a run is checked, planned, composed and given a backend once, whatever the entry point.

Counted in-process on the real paths (the command line's `main`, the web page's Studio, a sweep) by wrapping the
functions that do each thing: `check_settings` (validation), `planner.plan` (the memory planner), Hydra's config
loader (composition) and `backends.build_backend` (backend construction).
"""

from __future__ import annotations

import collections
import dataclasses
import logging

import pytest

import backends
import contentv.planner
import contentv.validation
import demo
from contentv.config import BackendConfig
from contentv.form import Form
from tests import helpers

TINY = [*helpers.TINY]


@pytest.fixture
def counts(monkeypatch, cache_dir):
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    counter: collections.Counter = collections.Counter()

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counter[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(contentv.validation, "check_settings", counting("validate", contentv.validation.check_settings))
    monkeypatch.setattr(contentv.planner, "plan", counting("plan", contentv.planner.plan))
    monkeypatch.setattr(backends, "build_backend", counting("backend", backends.build_backend))
    load = ConfigLoaderImpl.load_configuration
    monkeypatch.setattr(ConfigLoaderImpl, "load_configuration", counting("compose", load))
    yield counter
    logging.getLogger().handlers.clear()  # Hydra's job logging points at the test's run folder


def test_a_command_line_video_is_composed_checked_planned_and_built_once(counts, tmp_path):
    assert demo.main([*TINY, f"hydra.run.dir={tmp_path / 'run'}"]) == 0
    assert list((tmp_path / "run").glob("*.mp4"))
    assert dict(counts) == {"compose": 1, "validate": 1, "plan": 1, "backend": 1}


def test_a_two_job_sweep_checks_and_plans_each_job_once_and_builds_one_backend(counts, tmp_path):
    code = 0
    try:
        demo.main(["-m", *TINY, "sampling.seed=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    except SystemExit as exc:  # the sweep callback exits 1 only when a job failed
        code = exc.code
    assert code in (0, None)
    assert len(list((tmp_path / "sweep").glob("*/*.mp4"))) == 2
    assert counts["validate"] == 2 and counts["plan"] == 2 and counts["backend"] == 1
    # Composition: the pre-flight check composes each job once (the sweeper's own check of each job is skipped, the
    # summary reuses them); Hydra's launcher composes each job again for its per-job Hydra config, and Hydra's
    # multirun composes the primary config twice (to read its mode, then to start).
    assert counts["compose"] == 2 * 2 + 2


def test_a_web_page_generation_is_checked_and_planned_once(counts, tmp_path):
    from contentv.config import RunConfig
    from contentv.form import SAMPLING_FIELDS
    from contentv.studio import Studio

    presets = demo.load_presets()
    cfg = demo.load_config([*TINY, f"output.dir={tmp_path}"])
    studio = Studio(cfg, presets, backends.build_backend)
    counts.clear()
    defaults = studio.defaults()
    form = Form(**{**dataclasses.asdict(defaults), "sampling": {k: defaults.sampling[k] for k in SAMPLING_FIELDS}})
    job, message = studio.prepare(form, session="s")
    assert job is not None, message
    outcome = studio.generate(job)
    assert outcome.ok, outcome.status
    assert dict(counts) == {"validate": 1, "plan": 1, "backend": 1}
    assert isinstance(studio.base, RunConfig)
    studio.close()


def test_ranks_are_handed_one_decision(cache_dir):
    """Runtime.resolve under a launch: rank 0 decides from the smallest free memory and every rank gets its answer
    (a stand-in World with two ranks in one process: gather/broadcast as torch.distributed would)."""
    from contentv.config import MemoryConfig, ModelConfig, RunConfig, SamplingConfig
    from contentv.parallel import World
    from contentv.runtime import Runtime

    class TwoRanks(World):
        def gather(self, obj):
            self.gathered = obj
            return [obj, 2**20]  # the other rank reports 1 MiB free

        def broadcast(self, obj, src=0):
            return obj

    backend = backends.build_backend(BackendConfig(name="cpu"))
    world = TwoRanks(rank=0, size=2)
    runtime = Runtime(backend, presets={"none": MemoryConfig(name="none")}, world=world, progress=False)
    cfg = RunConfig(backend=BackendConfig(name="cpu"), model=ModelConfig(name="tiny_contentv", tiny=True, path=None))
    cfg.sampling = SamplingConfig(prompt="a cat", height=32, width=48, num_frames=5, num_inference_steps=1)
    cfg.memory = MemoryConfig(name="auto")
    cfg.parallel.data_parallel_degree = 2
    with pytest.raises(contentv.errors.ConfigError, match="memory.budget_gb=0.0"):
        runtime.resolve(cfg)  # nothing fits the smaller rank's 1 MiB: every rank hears rank 0's one line


def test_auto_never_offers_a_preset_the_parallel_layout_cannot_run(monkeypatch, cache_dir):
    """parallel.cfg_parallel needs batched guidance: memory=auto's candidates leave out presets with sequential
    guidance (low_vram_8g), which would fail after loading (the planner never saw the parallel settings before)."""
    from contentv import resolve
    from contentv.config import MemoryConfig, ModelConfig, RunConfig, SamplingConfig

    seen = {}
    plan = contentv.planner.plan

    def spy(cfg, presets, *args, **kwargs):
        seen.update(presets)
        return plan(cfg, presets, *args, **kwargs)

    monkeypatch.setattr(contentv.planner, "plan", spy)
    presets = {
        "none": MemoryConfig(name="none"),
        "low_vram_8g": MemoryConfig(name="low_vram_8g", guidance_mode="sequential"),
    }
    cfg = RunConfig(backend=BackendConfig(name="cpu"), model=ModelConfig(name="tiny_contentv", tiny=True, path=None))
    cfg.sampling = SamplingConfig(prompt="a cat", height=32, width=48, num_frames=5, num_inference_steps=1)
    cfg.memory, cfg.parallel.cfg_parallel = MemoryConfig(name="auto", budget_gb=8), True
    backend = backends.build_backend(BackendConfig(name="cpu"))
    run = resolve.resolve_run(cfg, backend, presets=presets, world_size=2)
    assert set(seen) == {"none"} and run.memory.name == "none" and run.layout[1] == 2
