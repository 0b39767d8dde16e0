"""One resolved run: every decision about a run made once, in one place, and handed on.

`resolve_run` checks a `RunConfig` (every field, the model's rules, the prompt file, the output folder, the
checkpoint, the attention kernel) and decides what will run: memory=auto's preset, VAE tiling for this size on
this device, the guidance mode, the parallel layout and what changes the output. It runs the memory planner at
most once. The result, a `ResolvedRun`, is what the command line, the web page, sweeps, data-parallel ranks and
the Python API hand to `Runtime`, which trusts it and decides nothing again. The one later change, an
out-of-memory fallback, is made by `ResolvedRun.with_fallback` and recorded.

Under torchrun every rank must hold the same object: `Runtime.resolve` decides on rank 0 (from the smallest free
device memory of all ranks) and broadcasts the result, errors included.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from contentv import memory_policy
from contentv.config import MemoryConfig, RunConfig, SamplingConfig
from contentv.errors import ConfigError

if TYPE_CHECKING:
    from contentv.planner import Plan, Strategy
    from contentv.registry import ModelSpec

log = logging.getLogger(__name__)

# How many times each decision was taken in this process (tests count them: one per run).
COUNTS: dict[str, int] = {"resolve": 0, "plan": 0}


@dataclass(frozen=True)
class ResolvedRun:
    """A checked run and every decision about it. Treat it as read-only: `config()` hands out copies.

    `_config` holds what runs: sampling with the model's defaults filled in (the first prompt), and memory as it
    will run (memory=auto's choice, vae_tiling decided). `requested_memory` is the preset that was asked for.
    """

    _config: RunConfig
    prompts: tuple[str, ...]  # the prompt, or every line of sampling.prompt_file
    requested_memory: str  # memory.name as asked (auto, a preset, or a preset with overrides)
    memory_choice: str  # one line: how the memory strategy was decided
    checkpoint: str | None  # folder or hub id; None for a tiny model (built, cached, at load)
    attention: str  # the attention kernel's name (the backend's choice for backend.attention=auto)
    guidance: str  # batched | sequential | none: what the denoising loop runs
    guidance_mode: str = "batched"  # batched | sequential: how the pipeline is asked to run guided steps
    world_size: int = 1
    layout: tuple[int, int, int, int] = (1, 1, 1, 1)  # (data parallel, cfg, ring, ulysses)
    output_changes: tuple[str, ...] = ()  # what makes these frames differ from everything resident
    plan_text: str = ""  # the planner's table when memory=auto chose (the web page shows it)
    fallback: dict | None = None  # an out-of-memory fallback: {"from", "to", "error"}
    notes: tuple[str, ...] = field(default=())
    invocation: dict = field(default_factory=dict)  # how it was started (the entry point says: argv, overrides)

    # ------------------------------------------------------------ views

    def config(self) -> RunConfig:
        """A copy of the config that runs (mutating it changes nothing here)."""
        return copy.deepcopy(self._config)

    @property
    def sampling(self) -> SamplingConfig:
        return copy.deepcopy(self._config.sampling)

    @property
    def memory(self) -> MemoryConfig:
        return copy.deepcopy(self._config.memory)

    @property
    def model(self) -> Any:
        return copy.deepcopy(self._config.model)

    @property
    def spec(self) -> ModelSpec:
        from contentv.registry import get_spec

        return get_spec(self._config.model.family)

    @property
    def pipeline_key(self) -> str:
        """What a loaded, prepared pipeline depends on: model, memory (not the per-video switches), speed-ups and
        the parallel settings. Jobs with the same key reuse one pipeline."""
        import json

        c = self._config
        memory = {k: v for k, v in dataclasses.asdict(c.memory).items() if k not in PER_CALL_MEMORY}
        parts = [dataclasses.asdict(c.model), memory, dataclasses.asdict(c.speedup), dataclasses.asdict(c.parallel)]
        return json.dumps(parts, sort_keys=True, default=str)

    def record(self) -> dict:
        """What the sidecar says about the decisions."""
        out: dict[str, Any] = {
            "requested_memory": self.requested_memory,
            "memory_choice": self.memory_choice,
            "attention": self.attention,
            "guidance": self.guidance,
            "output_changes": list(self.output_changes),
        }
        if self.world_size > 1:
            out["world_size"], out["layout"] = self.world_size, list(self.layout)
        if self.fallback:
            out["memory_fallback"] = dict(self.fallback)
        return out

    # ------------------------------------------------------------ derived runs (no new decisions)

    def item(self, prompt: str, seed: int | None = None, name: str | None = None) -> ResolvedRun:
        """The same run for one of its videos: one prompt of `prompts` (and a seed of parallel.seeds)."""
        c = self.config()
        c.sampling.prompt, c.sampling.prompt_file = prompt, None
        if seed is not None:
            c.sampling.seed = seed
        if name is not None:
            c.output.name = name
        return dataclasses.replace(self, _config=c, prompts=(prompt,))

    def with_output_dir(self, folder: str) -> ResolvedRun:
        c = self.config()
        c.output.dir = str(folder)
        return dataclasses.replace(self, _config=c)

    def with_fallback(self, strategy: Strategy, error: str) -> ResolvedRun:
        """The one change made after loading: an out-of-memory retry with a lighter strategy, recorded."""
        c = self.config()
        memory = copy.deepcopy(strategy.memory)
        memory.vae_tiling = bool(strategy.vae_tiling) if memory.vae_tiling is None else memory.vae_tiling
        c.memory = memory
        fallback = {"from": self._config.memory.name, "to": memory.name, "error": error}
        return dataclasses.replace(
            self,
            _config=c,
            memory_choice=f"{self.memory_choice}; out of memory, retried with {memory.name}",
            output_changes=_output_changes(c),
            fallback=fallback,
        )


# Chosen per video or only planned with: none of them invalidates the prepared pipeline.
PER_CALL_MEMORY = ("guidance_mode", "vae_tiling", "budget_gb", "check_fit")


def _output_changes(cfg: RunConfig) -> tuple[str, ...]:
    from contentv import speedup

    return tuple(memory_policy.output_changes(cfg.memory) + speedup.output_changes(cfg.speedup))


# ------------------------------------------------------------------------------------------ resolving


def resolve_run(
    cfg: RunConfig,
    backend: Any = None,
    *,
    presets: Mapping[str, MemoryConfig] | None = None,
    world_size: int = 1,
    budget_bytes: int | None = None,
    output_dir: str | os.PathLike | None = None,
    output_option: str = "output.dir",
) -> ResolvedRun:
    """Check `cfg` and decide everything about the run, once (ConfigError, one line, on the first problem).

    `backend`: the device backend (None: settings and files only, no device decisions: a dry run's or a
    launcher's check). `presets`: what memory=auto chooses from. `budget_bytes`: the device memory the run may
    use (the caller measures it: the free memory before anything was loaded, the smallest of all ranks under
    torchrun); memory.budget_gb wins over it. `output_dir`: where files go when output.dir is null (the entry
    point's run folder), reported as `output_option`.
    """
    from contentv.validation import check_run_files, check_settings

    COUNTS["resolve"] += 1
    cfg = copy.deepcopy(cfg)
    checked = check_settings(cfg, backend, world_size=world_size)
    checkpoint = check_run_files(cfg, checked.spec, output_dir=output_dir, output_option=output_option)
    attention = cfg.backend.attention
    if backend is not None:
        backend.attention_kernel()  # an unknown, missing or unusable kernel fails here
        attention = getattr(backend, "kernel_name", "") or attention
    requested = cfg.memory.name
    cfg.sampling = dataclasses.replace(checked.sampling, prompt=checked.prompts[0], prompt_file=None)
    if checked.sampling.prompt_file:
        cfg.sampling.prompt_file = checked.sampling.prompt_file  # recorded; the prompts are in `prompts`
    plan_text, choice = "", "as configured"
    if backend is not None and not cfg.dry_run:
        cfg.memory, choice, plan_text = _decide_memory(cfg, backend, presets, budget_bytes)
    from contentv import parallel

    lay = parallel.layout(cfg.parallel, world_size)
    batched = getattr(backend, "batched_guidance", True)
    return ResolvedRun(
        _config=cfg,
        prompts=tuple(checked.prompts),
        requested_memory=requested,
        memory_choice=choice,
        checkpoint=checkpoint,
        attention=attention,
        guidance=memory_policy.guidance_passes(cfg.memory, cfg.sampling.guidance_scale, batched),
        guidance_mode=memory_policy.guidance_mode(cfg.memory, batched),
        world_size=world_size,
        layout=tuple(lay.shape),
        output_changes=_output_changes(cfg),
        plan_text=plan_text,
    )


def _parallel_ok(cfg: RunConfig, memory: MemoryConfig) -> bool:
    """Whether a memory preset can run with this run's parallel settings (auto must not pick one that can't)."""
    from contentv import parallel

    try:
        parallel.check(cfg.parallel, memory, cfg.speedup)
    except ConfigError:
        return False
    return True


def _decide_memory(
    cfg: RunConfig,
    backend: Any,
    presets: Mapping[str, MemoryConfig] | None,
    budget_bytes: int | None,
) -> tuple[MemoryConfig, str, str]:
    """(the memory strategy that runs, how it was decided, the plan's table for memory=auto). One plan at most."""
    from contentv.planner import check_fits, format_plan, host_available, own_strategy, plan

    if cfg.memory.name == "auto":
        if not presets:
            raise ConfigError(
                "memory", "auto", "a run given the memory presets to choose from (Runtime(backend, presets=...))"
            )
        candidates = {n: m for n, m in presets.items() if n != "auto" and _parallel_ok(cfg, m)}
        COUNTS["plan"] += 1
        p: Plan = plan(cfg, candidates, backend, budget_bytes=budget_bytes, host_budget_bytes=host_available())
        if p.chosen is None:  # no device budget known (CPU): everything resident
            memory = MemoryConfig(name="none")
            return memory, "memory=auto: no device budget known, so none", format_plan(p)
        memory = copy.deepcopy(p.chosen.memory)
        backend.check_memory(memory)
        if memory.vae_tiling is None:
            memory.vae_tiling = bool(p.chosen.vae_tiling)
        why = f"memory=auto chose {memory.name} (predicted peak {p.chosen.device_bytes / 2**30:.2f} GiB"
        why += f" of {p.budget_bytes / 2**30:.2f} GiB)" if p.budget_bytes else ")"
        log.info(why)
        return memory, why, format_plan(p)
    memory = copy.deepcopy(cfg.memory)
    if memory.vae_tiling is None or (memory.check_fit and not cfg.dry_run):
        COUNTS["plan"] += 1
        own = own_strategy(cfg, backend, budget_bytes)
        if memory.check_fit:
            device = str(getattr(backend, "device", "the device"))
            check_fits(cfg, backend, budget_bytes, host_available(), device=device, own=own)
        if memory.vae_tiling is None:
            memory.vae_tiling = bool(own[0].vae_tiling)
            log.info("memory.vae_tiling=null: %s for this video", "tiled" if memory.vae_tiling else "untiled")
    return memory, "as configured", ""
