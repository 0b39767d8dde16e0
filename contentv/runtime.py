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

import dataclasses
import gc
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from contentv import parallel, speedup
from contentv.attention import AttentionKernel
from contentv.config import MemoryConfig, RunConfig, SamplingConfig, parse_dtype, resolve_sampling
from contentv.errors import ConfigError
from contentv.registry import ModelSpec, get_spec
from contentv.stats import StageRecorder
from contentv.validation import check_writable_dir, is_hub_id, read_prompt_file
from contentv.video import slugify, write_json, write_mp4

log = logging.getLogger(__name__)
GUIDANCE_MODES = ("auto", "batched", "sequential")
MODES = ("generate", "ui")


class DeviceBackend(Protocol):
    """The members of `backends.Backend` the runtime uses."""

    name: str
    device: torch.device
    supports_offload_streams: bool
    batched_guidance: bool

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


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("contentv", "torch", "diffusers", "transformers", "accelerate", "hydra-core", "imageio-ffmpeg"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def resolve_guidance(memory: MemoryConfig, batched: bool = True) -> str:
    """auto -> the backend's preference: batched on accelerators (one batch-2 forward per step fills the
    device better and halves weight traffic under offload), sequential on the CPU (no gain from batching
    there, measured by benchmarks/cpu_reference.py). Presets for small cards choose sequential explicitly."""
    if memory.guidance_mode not in GUIDANCE_MODES:
        raise ConfigError("memory.guidance_mode", memory.guidance_mode, GUIDANCE_MODES)
    if memory.guidance_mode == "auto":
        return "batched" if batched else "sequential"
    return memory.guidance_mode


def validate_run(cfg: RunConfig) -> tuple[ModelSpec, SamplingConfig]:
    """Everything checkable before loading weights (settings, checkpoint folder, output folder).

    Raises ConfigError naming the option, the value and what is allowed.
    """
    spec = get_spec(cfg.model.family)
    sampling = resolve_sampling(cfg.sampling, cfg.model)
    prompts = read_prompt_file(sampling.prompt_file) if sampling.prompt_file else [sampling.prompt]
    for prompt in prompts:
        spec.validate(dataclasses.replace(sampling, prompt=prompt))
    if spec.validate_for_model is not None:
        spec.validate_for_model(cfg.model, sampling)
    resolve_guidance(cfg.memory)
    for name in cfg.memory.quantize or ():
        if name not in spec.components:
            raise ConfigError("memory.quantize", name, spec.components)
    speedup.check(cfg.speedup)
    parallel.check(cfg.parallel, cfg.memory, cfg.speedup)
    if cfg.mode not in MODES:
        raise ConfigError("mode", cfg.mode, MODES)
    for option, value in (("model.dtype", cfg.model.dtype), ("model.vae_dtype", cfg.model.vae_dtype)):
        parse_dtype(option, value)
    if cfg.model.text_encoder_dtype is not None:
        parse_dtype("model.text_encoder_dtype", cfg.model.text_encoder_dtype)
    if not 0 <= cfg.output.crf <= 51:
        raise ConfigError("output.crf", cfg.output.crf, "an integer in 0..51")
    if cfg.output.dir is not None:
        check_writable_dir("output.dir", cfg.output.dir)
    if not cfg.model.tiny:
        spec.check_checkpoint(spec.resolve_path(cfg.model))
    return spec, sampling


def _key(cfg: RunConfig) -> str:
    # guidance_mode is chosen per call, so it doesn't invalidate the prepared pipeline
    memory = {k: v for k, v in dataclasses.asdict(cfg.memory).items() if k != "guidance_mode"}
    parts = [dataclasses.asdict(cfg.model), memory, dataclasses.asdict(cfg.speedup), dataclasses.asdict(cfg.parallel)]
    return json.dumps(parts, sort_keys=True)


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


class Runtime:
    """Holds one prepared pipeline, reused while (model, memory) stay the same on this backend."""

    def __init__(self, backend: DeviceBackend, conf_dir: Path = CONF_DIR, world: parallel.World | None = None):
        self.backend = backend
        self.conf_dir = Path(conf_dir)
        self.world = world or parallel.World()  # one process unless the entry point set up torch.distributed
        self._key: str | None = None
        self._pipe: Any = None
        self._prepared: dict = {}
        self.loads = 0  # how many times weights were loaded (sweeps check this)

    def plan(self, cfg: RunConfig):
        """The memory plan for cfg on this backend (contentv.planner.Plan); loads no weights."""
        from contentv.planner import plan

        return plan(
            cfg,
            self.conf_dir,
            self.backend.free_memory(),
            streams=self.backend.supports_offload_streams,
            check=self.backend.check_memory,
        )

    def resolve_memory(self, cfg: RunConfig) -> RunConfig:
        """memory=auto -> the fastest preset that fits (planner); other presets unchanged."""
        if cfg.memory.name != "auto":
            return cfg
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
            self._pipe = spec.load(cfg.model, path)
        except OSError as exc:
            if not is_hub_id(path):
                raise
            raise OSError(
                f"could not load {path} from the Hugging Face hub or its local cache ({_first_line(exc)}); "
                f"without network, download it elsewhere and pass model.path=<folder>"
            ) from exc
        self.loads += 1
        par = parallel.apply(self._pipe, cfg.parallel, spec.family, self.world)  # before any placement/offload
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

    def generate(self, cfg: RunConfig, callback_on_step_end=None) -> RunResult:
        """Validate, load (cached), generate. Returns frames and statistics; writes nothing."""
        cfg = self.resolve_memory(cfg)
        spec, sampling = validate_run(cfg)
        recorder = StageRecorder(self.backend)
        loads = self.loads
        with recorder.stage("load"):
            pipe = self.pipeline(cfg)
        reused = self.loads == loads
        generator = torch.Generator(device="cpu").manual_seed(sampling.seed)
        out = pipe(
            **spec.call_kwargs(sampling),
            guidance_mode=resolve_guidance(cfg.memory, self.backend.batched_guidance),
            generator=generator,
            output_type="np",
            stage_context=recorder.stage,
            callback_on_step_end=callback_on_step_end,
        )
        return RunResult(
            frames=out.frames[0],
            sampling=sampling,
            stages=recorder.as_dict(),
            prepared={**self._prepared, "pipeline_reused": reused, "pipeline_loads": self.loads},
        )

    def run_all(self, cfg: RunConfig, callback_on_step_end=None) -> list[RunResult]:
        """One video, or one per line of sampling.prompt_file (the pipeline is loaded once)."""
        if not cfg.sampling.prompt_file:
            return [self.run(cfg, callback_on_step_end)]
        results = []
        prompts = read_prompt_file(cfg.sampling.prompt_file)
        for i, prompt in enumerate(prompts, 1):
            log.info("prompt %d of %d: %s", i, len(prompts), prompt)
            one = dataclasses.replace(cfg, sampling=dataclasses.replace(cfg.sampling, prompt=prompt, prompt_file=None))
            results.append(self.run(one, callback_on_step_end))
        return results

    def run(self, cfg: RunConfig, callback_on_step_end=None) -> RunResult:
        """Generate and write `<dir>/<stem>.mp4` plus `<stem>.json`; returns the result with paths."""
        cfg = self.resolve_memory(cfg)
        result = self.generate(cfg, callback_on_step_end=callback_on_step_end)
        s = result.sampling
        folder = self.output_dir(cfg)
        stem = cfg.output.name or f"{slugify(s.prompt)}_seed{s.seed}"
        start = time.perf_counter()
        result.video = write_mp4(
            result.frames,
            folder,
            stem,
            fps=s.fps,
            crf=cfg.output.crf,
            metadata={"title": s.prompt, "comment": f"seed={s.seed}; prompt={s.prompt}", "seed": str(s.seed)},
        )
        result.stages["writing"] = {
            "seconds": time.perf_counter() - start,
            "peak_device_bytes": None,
            "peak_host_rss_bytes": None,
        }
        result.record = self.record(cfg, result)
        if cfg.output.sidecar:
            result.sidecar = write_json(result.record, result.video.with_suffix(".json"))
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
            "timings_s": {k: round(v["seconds"], 4) for k, v in stages.items()},
            "seconds_per_step": round(stages["denoising"]["seconds"] / s.num_inference_steps, 4),
            "peak_memory": {
                "device_bytes": max(dev) if dev else None,
                "host_rss_bytes": max(rss) if rss else None,
            },
            "stages": stages,
        }
