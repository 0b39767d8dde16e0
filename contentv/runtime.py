"""The run: validate -> load (cached) -> prepare on the backend -> generate -> write video and sidecar.

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
import json
import logging
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from contentv import memory_policy, progress, speedup
from contentv.attention import AttentionKernel
from contentv.config import MemoryConfig, ModelConfig, RunConfig, SamplingConfig
from contentv.errors import ConfigError, OutOfMemory, first_line
from contentv.parallel import World
from contentv.parallel.context import apply as apply_parallel
from contentv.registry import ModelSpec, get_spec
from contentv.stats import StageRecorder
from contentv.validation import CheckedRun, is_hub_id, read_prompt_file, validate_run
from contentv.video import slugify, staged_mp4

if TYPE_CHECKING:
    from contentv.planner import Plan, Strategy

log = logging.getLogger(__name__)

# diffusers' callback_on_step_end: (pipeline, step index, timestep, requested tensors) -> tensors to replace.
StepCallback = Callable[[Any, int, torch.Tensor, dict], dict]


class DeviceBackend(Protocol):
    """The members of `backends.Backend` the runtime uses."""

    name: str
    device: torch.device
    supports_offload_streams: bool
    batched_guidance: bool

    def setup(self) -> None: ...
    def quantization_methods(self) -> tuple[str, ...]: ...
    def attention_kernel(self) -> AttentionKernel: ...
    def check_memory(self, memory: MemoryConfig) -> None: ...
    def free_memory(self) -> int | None: ...
    def prepare(self, pipe: Any, memory: MemoryConfig, spec: ModelSpec) -> dict: ...
    def synchronize(self) -> None: ...
    def reset_peak_memory(self) -> None: ...
    def peak_memory(self) -> int | None: ...
    def empty_cache(self) -> None: ...
    def describe(self) -> dict: ...


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


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    this = __name__.split(".")[0]  # this distribution
    for name in (this, "torch", "diffusers", "transformers", "accelerate", "hydra-core", "imageio-ffmpeg"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def process_start() -> float:
    """When this process started running the runtime (epoch seconds): the first `import contentv` (demo.py does it
    before anything heavy). The OS's process start would count a shell's time when the shell exec'd Python."""
    import contentv

    return contentv.IMPORTED_AT


def checkpoint_record(model: ModelConfig, path: str) -> dict:
    """Where the weights came from: the configured path, the local folder it resolved to (a hub id's snapshot in the
    local cache), and for a tiny model its build hash (the folder name's suffix)."""
    from contentv.models.common import local_config_folder

    folder = local_config_folder(path, "model_index.json", model.revision)
    out = {"path": model.path, "folder": str(Path(folder).absolute()) if folder else None}
    if model.tiny:
        out["tiny_hash"] = Path(path).name.rsplit("-", 1)[-1]
    return out


# Chosen per video (guidance_mode, vae_tiling) or only planned with (budget_gb, check_fit): none of them invalidates
# the prepared pipeline.
PER_CALL_MEMORY = ("guidance_mode", "vae_tiling", "budget_gb", "check_fit")


def set_vae_tiling(pipe: Any, tiled: bool) -> bool:
    """Tiled or untiled decoding for the next video (diffusers' VAE switches; the tile sizes are kept)."""
    vae = getattr(pipe, "vae", None)
    if vae is not None and hasattr(vae, "disable_tiling"):
        (vae.enable_tiling if tiled else vae.disable_tiling)()
    return bool(tiled)


def _key(cfg: RunConfig) -> str:
    memory = {k: v for k, v in dataclasses.asdict(cfg.memory).items() if k not in PER_CALL_MEMORY}
    parts = [dataclasses.asdict(cfg.model), memory, dataclasses.asdict(cfg.speedup), dataclasses.asdict(cfg.parallel)]
    return json.dumps(parts, sort_keys=True)


class Runtime:
    """Holds one prepared pipeline, reused while (model, memory) stay the same on this backend.

    `presets`: the memory presets `memory=auto` chooses from (the entry point composes them from conf/memory;
    `demo.load_presets()` gives them to Python users). `world`: this process's place in a multi-process launch
    (one process by default).
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

    def validate(self, cfg: RunConfig) -> CheckedRun:
        """Every check that needs no weights, on this backend (ConfigError on the first failure)."""
        return validate_run(cfg, self.backend, world_size=self.world.size)

    def plan(self, cfg: RunConfig) -> Plan:
        """The memory plan for cfg on this backend (contentv.planner.Plan); loads no weights."""
        from contentv.planner import host_available, plan

        return plan(
            cfg,
            self.presets,
            self.backend,
            budget_bytes=self.backend.free_memory(),
            host_budget_bytes=host_available(),
        )

    def resolve_memory(self, cfg: RunConfig) -> RunConfig:
        """memory=auto -> the fastest preset that fits (planner); other presets unchanged."""
        if cfg.memory.name != "auto":
            return cfg
        if not self.presets:
            raise ConfigError(
                "memory", "auto", "a Runtime given the memory presets to choose from: Runtime(backend, presets=...)"
            )
        chosen = self.plan(cfg).chosen
        if chosen is None:  # no budget known (CPU): everything resident
            log.info("memory=auto: no device budget known; using none")
            return dataclasses.replace(cfg, memory=MemoryConfig(name="none"))
        log.info("memory=auto chose %s (predicted peak %.2f GiB)", chosen.memory.name, chosen.device_bytes / 2**30)
        return dataclasses.replace(cfg, memory=chosen.memory)

    @staticmethod
    def output_dir(cfg: RunConfig) -> Path:
        return Path(cfg.output.dir or "outputs")

    # ------------------------------------------------------------ pipeline cache

    def pipeline(self, cfg: RunConfig) -> Any:
        """The prepared pipeline for cfg's (model, memory); loads weights only when that key changes."""
        key = _key(cfg)
        if key == self._key and self._pipe is not None:
            return self._pipe
        self.release()
        spec = get_spec(cfg.model.family)
        path = spec.resolve_path(cfg.model)
        spec.check_checkpoint(path)
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
        """Drop the cached pipeline and return its memory to the device."""
        if self._pipe is None:
            return
        self._pipe, self._key, self._prepared = None, None, {}
        gc.collect()
        self.backend.empty_cache()

    # ------------------------------------------------------------ generation

    def generate(self, cfg: RunConfig, callback_on_step_end: StepCallback | None = None) -> RunResult:
        """Validate, load (cached), generate. Returns frames and statistics; writes nothing.

        If the device runs out of memory: under memory=auto the runtime frees it and retries once with the next
        lower-memory strategy the planner recommends (logged, and recorded as prepared["memory_fallback"]); with a
        strategy set explicitly it stops with OutOfMemory, one line naming the planner's suggestion.
        """
        chosen_by_planner = cfg.memory.name == "auto"
        cfg = self.resolve_memory(cfg)
        error = None
        try:
            return self._generate(cfg, callback_on_step_end)
        except Exception as exc:
            if not self.backend.is_out_of_memory(exc):
                raise
            error = first_line(exc)
        # Out of the except block: the exception's frames (and the tensors they held) are gone, so this frees them.
        self.release()
        where, failed = self.backend.device, cfg.memory.name
        lighter = self.lighter_strategy(cfg)
        if lighter is None:
            raise OutOfMemory(
                f"out of memory on {where} with memory={failed} ({error}); no strategy the planner knows needs less: "
                "fewer frames or a smaller size"
            )
        if not chosen_by_planner:
            raise OutOfMemory(
                f"out of memory on {where} with memory={failed}; the planner suggests memory={lighter.name} "
                f"(predicted peak {lighter.device_bytes / 2**30:.1f} GiB): run again with memory={lighter.name}, "
                "or memory=auto to let the runtime switch"
            )
        log.warning(
            "out of memory on %s with memory=%s (%s): retrying once with memory=%s", where, failed, error, lighter.name
        )
        retry = dataclasses.replace(cfg, memory=lighter.memory)
        try:
            result = self._generate(retry, callback_on_step_end)
        except Exception as exc:
            if not self.backend.is_out_of_memory(exc):
                raise
            error = first_line(exc)
        else:
            result.prepared["memory_fallback"] = {"from": failed, "to": lighter.name, "error": error}
            return result
        self.release()
        raise OutOfMemory(
            f"out of memory on {where} with memory={failed} and again with memory={lighter.name} ({error}): "
            "fewer frames or a smaller size"
        )

    def lighter_strategy(self, cfg: RunConfig) -> Strategy | None:
        """The fastest strategy predicted to need less device memory than cfg's (and to fit the host), or None."""
        from contentv.planner import host_available, plan

        memory = dataclasses.replace(cfg.memory, budget_gb=None)
        candidates = {**self.presets, memory.name: memory}
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

    def _generate(self, cfg: RunConfig, callback_on_step_end: StepCallback | None = None) -> RunResult:
        checked = self.validate(cfg)
        spec, sampling = checked.spec, checked.sampling
        if cfg.memory.vae_tiling is None:  # only where the untiled decode won't fit (tiling changes the frames)
            from contentv.planner import resolve_vae_tiling

            cfg = dataclasses.replace(cfg, memory=resolve_vae_tiling(cfg, self.backend, self.device_budget()))
            log.info("memory.vae_tiling=null: %s for this video", "tiled" if cfg.memory.vae_tiling else "untiled")
        recorder = StageRecorder(self.backend)
        loads = self.loads
        with recorder.stage("load"):
            pipe = self.pipeline(cfg)
        reused = self.loads == loads
        self._prepared["vae_tiling"] = set_vae_tiling(pipe, cfg.memory.vae_tiling)
        # what changes this video's frames, with vae_tiling as decided for it
        self._prepared["output_changes"] = memory_policy.output_changes(cfg.memory) + speedup.output_changes(
            cfg.speedup
        )
        generator = torch.Generator(device="cpu").manual_seed(sampling.seed)
        counter = getattr(pipe, "cache_counter", None)  # a step cache's skip counter (contentv.speedup)
        if counter is not None:
            counter.reset()
        out = pipe(
            **spec.call_kwargs(sampling),
            guidance_mode=memory_policy.guidance_mode(cfg.memory, self.backend.batched_guidance),
            generator=generator,
            output_type="np",
            stage_context=self._stage(recorder),
            callback_on_step_end=callback_on_step_end,
        )
        ran = {
            # what the loop actually ran: batched | sequential | none (guidance_scale <= 1: one pass per step)
            "guidance": memory_policy.guidance_passes(
                cfg.memory, sampling.guidance_scale, self.backend.batched_guidance
            ),
            "checkpoint": self._checkpoint,
        }
        if counter is not None:
            ran["step_cache"] = counter.record()  # transformer forwards, and those served from the cache
        return RunResult(
            frames=out.frames[0],
            sampling=sampling,
            stages=recorder.as_dict(),
            prepared={**self._prepared, "pipeline_reused": reused, "pipeline_loads": self.loads},
            memory=cfg.memory,
            ran=ran,
        )

    def run_all(self, cfg: RunConfig, callback_on_step_end: StepCallback | None = None) -> list[RunResult]:
        """Every video the config asks for: one, or one per line of sampling.prompt_file (weights load once).

        In a multi-process launch (or with parallel.seeds) the work is shared out (contentv.parallel.data): every
        rank writes into rank 0's output folder, and this rank's results are returned.
        """
        if self.world.size > 1 or cfg.parallel.seeds:
            from contentv.parallel.data import run_all

            output = dataclasses.replace(cfg.output, dir=self.world.broadcast(cfg.output.dir))
            return run_all(
                self, dataclasses.replace(cfg, output=output), cfg.parallel, self.world, callback_on_step_end
            )
        if not cfg.sampling.prompt_file:
            return [self.run(cfg, callback_on_step_end)]
        results = []
        prompts = read_prompt_file(cfg.sampling.prompt_file)
        for i, prompt in enumerate(prompts, 1):
            log.info("prompt %d of %d: %s", i, len(prompts), prompt)
            one = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, prompt=prompt, prompt_file=None))
            results.append(self.run(one, callback_on_step_end))
        return results

    def run(
        self, cfg: RunConfig, callback_on_step_end: StepCallback | None = None, *, since: float | None = None
    ) -> RunResult:
        """Generate and write `<dir>/<stem>.mp4` plus `<stem>.json`; returns the result with paths.

        `since` (epoch seconds): when this run's start-up began, recorded as "startup" (a server: the job's start).
        By default the first video of a process pays for starting it (interpreter, imports, pre-flight checks).
        """
        started = time.time()
        if since is None:
            since = process_start() if self.runs == 0 else started
        result = self.generate(cfg, callback_on_step_end=callback_on_step_end)
        self.runs += 1
        if since < started:
            result.wall["startup"] = started - since
        cfg = dataclasses.replace(cfg, memory=result.memory)  # what ran, in the sidecar
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
        s = result.sampling
        resolved = dataclasses.replace(cfg, sampling=s)
        stages = result.stages
        dev = [v["peak_device_bytes"] for v in stages.values() if v.get("peak_device_bytes") is not None]
        rss = [v["peak_host_rss_bytes"] for v in stages.values() if v.get("peak_host_rss_bytes") is not None]
        return {
            "video": result.video.name if result.video else None,
            "prompt": s.prompt,
            "negative_prompt": s.negative_prompt,
            "seed": s.seed,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": dataclasses.asdict(resolved),
            "versions": library_versions(),
            "device": self.backend.describe(),
            "prepared": result.prepared,
            **result.ran,
            # stage times; startup = process start -> this run (imports, checks; first run only), total = wall time
            "timings_s": {
                **({"startup": round(result.wall["startup"], 4)} if "startup" in result.wall else {}),
                **{k: round(v["seconds"], 4) for k, v in stages.items()},
                **({"total": round(result.wall["total"], 4)} if "total" in result.wall else {}),
            },
            "seconds_per_step": round(stages["denoising"]["seconds"] / s.num_inference_steps, 4),
            "peak_memory": {
                "device_bytes": max(dev) if dev else None,
                "host_rss_bytes": max(rss) if rss else None,
            },
            "stages": stages,
        }
