"""The run: resolve once -> load (cached) -> prepare on the backend -> generate -> write video and sidecar.

The backend is injected (anything with the `DeviceBackend` members), so this module never imports
`backends/` and never names a device. Python users:

>>> from backends import build_backend
>>> from contentv.config import BackendConfig, ModelConfig, RunConfig
>>> from contentv.runtime import Runtime
>>> cfg = RunConfig(backend=BackendConfig(name="cpu"))
>>> cfg.model = ModelConfig(name="tiny_contentv", tiny=True, path=None, dtype="float32")
>>> cfg.sampling.prompt, cfg.sampling.height, cfg.sampling.width = "a cat", 64, 96
>>> cfg.sampling.num_frames, cfg.sampling.num_inference_steps = 13, 4
>>> result = Runtime(build_backend(cfg.backend)).run(cfg)   # result.video, result.record
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from contentv import progress, speedup
from contentv.config import MemoryConfig, RunConfig, SamplingConfig
from contentv.device import DeviceBackend
from contentv.errors import ConfigError, OutOfMemory, first_line
from contentv.parallel import World
from contentv.parallel.context import apply as apply_parallel
from contentv.resolve import PER_CALL_MEMORY, ResolvedRun, resolve_run
from contentv.sidecar import checkpoint_record, library_versions, process_start, sidecar_record
from contentv.stats import StageRecorder
from contentv.validation import is_hub_id
from contentv.video import slugify, staged_mp4

if TYPE_CHECKING:
    from contentv.planner import Plan, Strategy

__all__ = ["PER_CALL_MEMORY", "ResolvedRun", "RunResult", "Runtime", "library_versions"]

log = logging.getLogger(__name__)

# diffusers' callback_on_step_end: (pipeline, step index, timestep, requested tensors) -> tensors to replace.
StepCallback = Callable[[Any, int, torch.Tensor, dict], dict]


@dataclass
class RunResult:
    frames: np.ndarray  # (F, H, W, 3) float in [0, 1]
    sampling: SamplingConfig  # resolved settings that produced it
    stages: dict[str, dict]  # per stage: seconds, peak_device_bytes, peak_host_rss_bytes
    prepared: dict  # what the backend applied: placement, kernel, quantization, ...
    video: Path | None = None
    sidecar: Path | None = None
    record: dict = field(default_factory=dict)
    memory: MemoryConfig | None = None  # the strategy that ran (memory=auto's choice, or a fallback's)
    ran: dict = field(default_factory=dict)  # guidance mode used, checkpoint folder, step-cache skips
    wall: dict = field(default_factory=dict)  # "startup" (process start -> this run; first run only), "total"
    run: ResolvedRun | None = None  # the resolved run that made it (with a fallback, the retry's)


def set_vae_tiling(pipe: Any, tiled: bool) -> bool:
    """Tiled or untiled decoding for the next video (diffusers' VAE switches; the tile sizes are kept)."""
    vae = getattr(pipe, "vae", None)
    if vae is not None and hasattr(vae, "disable_tiling"):
        (vae.enable_tiling if tiled else vae.disable_tiling)()
    return bool(tiled)


class Runtime:
    """Holds one prepared pipeline, reused while (model, memory) stay the same on this backend.

    `presets`: the memory presets `memory=auto` chooses from (the entry point composes them from conf/memory;
    `contentv_cli.load_presets()` gives them to Python users). `world`: this process's place in a multi-process
    launch (one process by default).

    Every entry point hands it a `ResolvedRun` (`Runtime.resolve` makes one; `run`, `run_all` and `generate` also
    take a `RunConfig` and resolve it first). What the resolved run says is what runs: nothing is decided again.
    """

    def __init__(
        self,
        backend: DeviceBackend,
        presets: Mapping[str, MemoryConfig] | None = None,
        world: World | None = None,
        progress: bool = True,
    ):
        self.backend = backend
        # One bar per long stage (loading, text encoding, denoising, decoding); the libraries' own bars always off.
        self.progress = progress
        from contentv import progress as bars  # (the argument shadows the module here)

        bars.own_bars_only()
        backend.setup()  # process-wide switches (TF32/HF32, current device); idempotent
        self.presets = dict(presets or {})
        self.world = world or World(device=backend.device)
        self._key: str | None = None
        self._pipe: Any = None
        self._prepared: dict = {}
        self._checkpoint: dict = {}
        self._budget: int | None = None  # the device's free memory before this runtime loaded anything
        self.loads = 0  # how many times weights were loaded (sweeps check this)
        self.runs = 0  # videos written by this runtime (the first one's record includes the process start-up)
        self.started_at: float | None = None  # where the first video's "startup" begins (None: the first import)

    # ------------------------------------------------------------ the one resolved run

    def resolve(
        self, cfg: RunConfig, *, output_dir: str | os.PathLike | None = None, output_option: str = "output.dir"
    ) -> ResolvedRun:
        """Check `cfg` and decide everything about the run (contentv.resolve.resolve_run) on this backend, with
        the device memory free before this runtime loaded anything as the budget.

        Under a multi-process launch every rank calls this: rank 0 decides from the smallest budget of all ranks
        and broadcasts the result (or its error), so every rank holds the same decisions.
        """
        budget = self.device_budget()
        if self.world.size == 1:
            return self._resolve(cfg, budget, output_dir, output_option)
        budgets = [b for b in self.world.gather(budget) if b is not None]
        budget = min(budgets) if budgets else None
        outcome: Any = None
        if self.world.rank == 0:
            try:
                outcome = self._resolve(cfg, budget, output_dir, output_option)
            except ConfigError as exc:
                outcome = ("config", exc.option, exc.value, exc.allowed)
            except Exception as exc:  # noqa: BLE001 - every rank must hear of it, or the others wait forever
                outcome = ("error", first_line(exc, with_type=True))
        outcome = self.world.broadcast(outcome)
        if isinstance(outcome, tuple) and outcome[0] == "config":
            raise ConfigError(*outcome[1:])
        if isinstance(outcome, tuple):
            raise RuntimeError(f"rank 0 could not resolve the run: {outcome[1]}")
        return outcome

    def _resolve(self, cfg: RunConfig, budget: int | None, output_dir: Any, output_option: str) -> ResolvedRun:
        return resolve_run(
            cfg,
            self.backend,
            presets=self.presets,
            world_size=self.world.size,
            budget_bytes=budget,
            output_dir=output_dir,
            output_option=output_option,
        )

    def validate(self, cfg: RunConfig) -> ResolvedRun:
        """Every check that needs no weights, and every decision, on this backend: `resolve` (ConfigError on the
        first failure)."""
        return self.resolve(cfg)

    def _as_run(self, run: ResolvedRun | RunConfig) -> ResolvedRun:
        return run if isinstance(run, ResolvedRun) else self.resolve(run)

    def plan(self, cfg: RunConfig) -> Plan:
        """The memory plan's table for cfg on this backend (contentv.planner.Plan); loads no weights."""
        from contentv.planner import host_available, plan

        return plan(
            cfg, self.presets, self.backend, budget_bytes=self.device_budget(), host_budget_bytes=host_available()
        )

    @staticmethod
    def output_dir(cfg: RunConfig) -> Path:
        return Path(cfg.output.dir or "outputs")

    # ------------------------------------------------------------ pipeline cache

    def pipeline(self, run: ResolvedRun | RunConfig) -> Any:
        """The prepared pipeline for the run's (model, memory); loads weights only when that key changes."""
        run = self._as_run(run)
        key = run.pipeline_key
        if key == self._key and self._pipe is not None:
            return self._pipe
        self.release()
        cfg, spec = run.config(), run.spec
        path = run.checkpoint or spec.resolve_path(cfg.model)  # a tiny model: built once, then cached
        log.info("loading %s from %s", cfg.model.name, path)
        try:
            with progress.stage(f"loading {cfg.model.name}", self.progress, unit="part"):  # ticked per component
                self._pipe = spec.load(cfg.model, path)
        except OSError as exc:
            if not is_hub_id(path):
                raise
            raise OSError(
                f"could not load {path} from the Hugging Face hub or its local cache ({first_line(exc)}); "
                f"without network, download it elsewhere and pass model.path=<folder>"
            ) from exc
        self.loads += 1
        self._checkpoint = checkpoint_record(cfg.model, path)
        self._pipe.set_progress_bar_config(desc="denoising", disable=not self.progress, dynamic_ncols=True)
        par = apply_parallel(self._pipe, cfg.parallel, spec, self.world)  # before any placement/offload
        self._prepared = self.backend.prepare(self._pipe, cfg.memory, spec)
        if par.kernel is not None:  # context parallelism replaces the backend's attention kernel
            spec.install_attention(self._pipe, par.kernel)
            self._prepared["attention_kernel"] = par.kernel.__name__
        self._prepared.update(par.record)
        self._prepared.update(speedup.apply(self._pipe, cfg.speedup))
        self._key = key
        return self._pipe

    def release(self) -> None:
        """Drop the cached pipeline and return its memory to the device (and pinned host memory to the host)."""
        if self._pipe is None:
            return
        self._pipe, self._key, self._prepared = None, None, {}
        gc.collect()
        self.backend.empty_cache()

    # ------------------------------------------------------------ generation

    def generate(self, run: ResolvedRun | RunConfig, callback_on_step_end: StepCallback | None = None) -> RunResult:
        """Load (cached) and generate the resolved run. Returns frames and statistics; writes nothing.

        If the device runs out of memory: under memory=auto the runtime frees it and retries once with the next
        lower-memory strategy the planner recommends (`ResolvedRun.with_fallback`, recorded); with a strategy set
        explicitly it stops with OutOfMemory, one line naming the planner's suggestion. Under a multi-process
        launch there is no retry: one rank retrying alone would leave the others waiting in a collective, so the
        rank stops with one line (the launcher then stops the others).
        """
        run = self._as_run(run)
        error = None
        try:
            return self._generate(run, callback_on_step_end)
        except Exception as exc:
            if not self.backend.is_out_of_memory(exc):
                raise
            error = first_line(exc)
        # Out of the except block: the exception's frames (and the tensors they held) are gone, so this frees them.
        self.release()
        retry = self._fallback(run, error)
        try:
            return self._generate(retry, callback_on_step_end)
        except Exception as exc:
            if not self.backend.is_out_of_memory(exc):
                raise
            error = first_line(exc)
        self.release()
        raise OutOfMemory(
            f"out of memory on {self.backend.device} with memory={run.memory.name} and again with "
            f"memory={retry.memory.name} ({error}): fewer frames or a smaller size"
        )

    def _fallback(self, run: ResolvedRun, error: str) -> ResolvedRun:
        """The retry after an out-of-memory error, or OutOfMemory (one line) where none is allowed or known."""
        where, failed = self.backend.device, run.memory.name
        if self.world.size > 1:
            raise OutOfMemory(
                f"out of memory on {where} (rank {self.world.rank} of {self.world.size}) with memory={failed} "
                f"({error}); every rank stops (a retry on one rank would leave the others waiting): run again with a "
                "lighter memory preset, fewer frames or a smaller size"
            )
        lighter = self.lighter_strategy(run)
        if lighter is None:
            raise OutOfMemory(
                f"out of memory on {where} with memory={failed} ({error}); no strategy the planner knows needs less: "
                "fewer frames or a smaller size"
            )
        if run.requested_memory != "auto":
            raise OutOfMemory(
                f"out of memory on {where} with memory={failed}; the planner suggests memory={lighter.name} "
                f"(predicted peak {lighter.device_bytes / 2**30:.1f} GiB): run again with memory={lighter.name}, "
                "or memory=auto to let the runtime switch"
            )
        log.warning(
            "out of memory on %s with memory=%s (%s): retrying once with memory=%s", where, failed, error, lighter.name
        )
        return run.with_fallback(lighter, error)

    def lighter_strategy(self, run: ResolvedRun) -> Strategy | None:
        """The fastest strategy predicted to need less device memory than the run's (and to fit the host), or None.
        (Known only after an out-of-memory error: the one planning done after a run was resolved.)"""
        from contentv.planner import host_available, plan

        cfg = run.config()
        memory = dataclasses.replace(cfg.memory, budget_gb=None)
        candidates = {**self.presets, memory.name: memory}
        candidates.pop("auto", None)
        p = plan(dataclasses.replace(cfg, memory=memory), candidates, self.backend)
        current = next(s for s in p.strategies if s.memory is memory)
        host = host_available()
        lighter = [
            s
            for s in p.strategies
            if not s.error
            and s.memory is not memory
            and s.device_bytes < current.device_bytes
            and s.host_peak_bytes <= host
        ]
        return min(lighter, key=lambda s: (s.time, s.device_bytes), default=None)

    def _stage(self, recorder: StageRecorder):
        """The pipeline's stage context: statistics for every stage, a bar for those without one of their own."""

        @contextlib.contextmanager
        def stage(name: str):
            show = self.progress and name != "denoising"  # denoising shows the pipeline's own step bar
            with recorder.stage(name), progress.stage(name.replace("_", " "), show):
                yield

        return stage

    def device_budget(self) -> int | None:
        """The device memory this runtime may plan with: its free memory before anything was loaded."""
        if self._pipe is None:
            self._budget = self.backend.free_memory()
        return self._budget

    def _generate(self, run: ResolvedRun, callback_on_step_end: StepCallback | None = None) -> RunResult:
        cfg, spec = run.config(), run.spec
        sampling = cfg.sampling
        recorder = StageRecorder(self.backend)
        loads = self.loads
        with recorder.stage("load"):
            pipe = self.pipeline(run)
        reused = self.loads == loads
        self._prepared["vae_tiling"] = set_vae_tiling(pipe, bool(cfg.memory.vae_tiling))
        self._prepared["output_changes"] = list(run.output_changes)  # with vae_tiling as decided for this video
        if run.fallback:
            self._prepared["memory_fallback"] = dict(run.fallback)
        generator = torch.Generator(device="cpu").manual_seed(sampling.seed)
        counter = getattr(pipe, "cache_counter", None)  # a step cache's skip counter (contentv.speedup)
        if counter is not None:
            counter.reset()
        out = pipe(
            **spec.call_kwargs(sampling),
            guidance_mode=run.guidance_mode,
            generator=generator,
            output_type="np",
            stage_context=self._stage(recorder),
            callback_on_step_end=callback_on_step_end,
        )
        # what the loop actually ran: batched | sequential | none (guidance_scale <= 1: one pass per step)
        ran = {"guidance": run.guidance, "checkpoint": self._checkpoint, "run": run.record()}
        if counter is not None:
            ran["step_cache"] = counter.record()  # transformer forwards, and those served from the cache
        prepared = {**self._prepared, "pipeline_reused": reused, "pipeline_loads": self.loads}
        if not run.fallback:
            prepared.pop("memory_fallback", None)
        return RunResult(
            frames=out.frames[0],
            sampling=sampling,
            stages=recorder.as_dict(),
            prepared=prepared,
            memory=cfg.memory,
            ran=ran,
            run=run,
        )

    def run_all(
        self, run: ResolvedRun | RunConfig, callback_on_step_end: StepCallback | None = None
    ) -> list[RunResult]:
        """Every video the run asks for: one, or one per line of sampling.prompt_file (weights load once).

        In a multi-process launch (or with parallel.seeds) the work is shared out (contentv.parallel.data): every
        rank writes into rank 0's output folder, and this rank's results are returned.
        """
        run = self._as_run(run)
        if self.world.size > 1 or run.config().parallel.seeds:
            from contentv.parallel.data import run_all

            run = run.with_output_dir(self.world.broadcast(run.config().output.dir)) if self.world.size > 1 else run
            return run_all(self, run, self.world, callback_on_step_end)
        if len(run.prompts) == 1 and not run.config().sampling.prompt_file:
            return [self.run(run, callback_on_step_end)]
        results = []
        log.info(
            "%d prompts%s",
            len(run.prompts),
            f" from {run.config().sampling.prompt_file}" if run.config().sampling.prompt_file else "",
        )
        for i, prompt in enumerate(run.prompts, 1):
            log.info("prompt %d of %d: %s", i, len(run.prompts), prompt)
            results.append(self.run(run.item(prompt), callback_on_step_end))
        return results

    def run(self, run: ResolvedRun | RunConfig, callback_on_step_end: StepCallback | None = None) -> RunResult:
        """Generate and write `<dir>/<stem>.mp4` plus `<stem>.json`; returns the result with paths."""
        started = time.time()
        # The first video of a process also pays for starting it (interpreter, imports, pre-flight checks).
        since = (self.started_at or process_start()) if self.runs == 0 else started
        result = self.generate(run, callback_on_step_end=callback_on_step_end)
        self.runs += 1
        if since < started:
            result.wall["startup"] = started - since
        cfg = result.run.config()  # what ran (memory=auto's choice, a fallback), in the sidecar
        s = result.sampling
        folder = self.output_dir(cfg)
        stem = cfg.output.name or f"{slugify(s.prompt)}_seed{s.seed}"
        start = time.perf_counter()
        with staged_mp4(  # encoded and checked, not yet published
            result.frames,
            folder,
            fps=s.fps,
            crf=cfg.output.crf,
            metadata={"title": s.prompt, "comment": f"seed={s.seed}; prompt={s.prompt}", "seed": str(s.seed)},
        ) as staged:
            result.stages["writing"] = {
                "seconds": time.perf_counter() - start,
                "peak_device_bytes": None,
                "peak_host_rss_bytes": None,
            }
            result.wall["total"] = time.time() - since
            result.record = self.record(cfg, result)
            # Video and sidecar under one free <stem>[-N] pair; the sidecar's "video" is the published name.
            result.video, result.sidecar = staged.publish(stem, result.record if cfg.output.sidecar else None)
        result.record["video"] = result.video.name
        return result

    def record(self, cfg: RunConfig, result: RunResult) -> dict:
        """The sidecar: what was asked, what ran, how long it took and how much memory it used."""
        return sidecar_record(cfg, result, self.backend.describe())
