"""A Videos API request -> the RunConfig the command line would run, checked by the command line's check.

The run is the server's composed config (its backend, memory, output settings) with the requested model's
preset, the request's prompt, size and seconds (contentv.serve.sizes) and this runtime's own settings given as
extra body fields. Clients never name server paths: the model comes from the presets the server offers
(serve.models), the output folder and file name are the server's. `check` is the one place a request is
validated before it is queued: a bad request never reaches a worker, and its 400 carries the command line's line.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

from contentv.config import Presets, RunConfig, SamplingConfig, ServeConfig, resolve_sampling
from contentv.errors import ConfigError
from contentv.form import convert, field_kind
from contentv.registry import get_spec
from contentv.serve import sizes
from contentv.validation import CheckedRun, validate_run

API_FIELDS = ("model", "prompt", "seconds", "size")
# This runtime's settings a request may add (extra body fields), as sampling fields; `memory` names a preset.
EXTRA_FIELDS = ("negative_prompt", "seed", "num_inference_steps", "guidance_scale", "memory")


@dataclasses.dataclass
class Admitted:
    """A checked request: the run to queue and the fields the API reports."""

    run: RunConfig
    model: str
    prompt: str
    size: str
    seconds: str
    model_key: str  # the worker's pipeline cache key: model and memory preset


class Admission:
    def __init__(self, base: RunConfig, presets: Presets, videos: Path, backend: Any = None):
        self.base = copy.deepcopy(base)
        self.serve: ServeConfig = base.serve
        self.videos = videos
        self.backend = backend
        offered = dict(presets.models)
        offered[base.model.name] = base.model  # the command line's model, with its overrides
        names = self.serve.models or [base.model.name]
        for i, name in enumerate(names):
            if name not in offered:
                raise ConfigError(f"serve.models[{i}]", name, sorted(offered))
        self.models = {n: offered[n] for n in names}
        self.memories = {base.memory.name: base.memory}
        for i, name in enumerate(self.serve.memory_presets):
            if name not in presets.memories:
                raise ConfigError(f"serve.memory_presets[{i}]", name, sorted(presets.memories))
            self.memories[name] = presets.memories[name]

    def build(self, fields: dict[str, Any], job_id: str) -> RunConfig:
        """The run a request asks for (ConfigError naming the field for what no config option checks)."""
        allowed = (*API_FIELDS, *EXTRA_FIELDS)
        for key, value in fields.items():
            if key not in allowed:
                raise ConfigError(key, value, f"a field this server takes: {', '.join(allowed)}")
        name = fields.get("model") or self.base.model.name
        if name not in self.models:
            raise ConfigError("model", name, sorted(self.models))
        prompt = fields.get("prompt")
        if prompt is not None and len(str(prompt)) > self.serve.max_prompt_chars:
            limit = self.serve.max_prompt_chars
            raise ConfigError(
                "prompt", prompt, f"at most {limit} characters (serve.max_prompt_chars; got {len(prompt)})"
            )
        run = copy.deepcopy(self.base)
        run.mode = "generate"
        run.model = copy.deepcopy(self.models[name])
        sampling = self.base.sampling if name == self.base.model.name else SamplingConfig(seed=self.base.sampling.seed)
        run.sampling = dataclasses.replace(sampling, prompt=prompt, prompt_file=None)
        memory = fields.get("memory") or self.base.memory.name
        if memory not in self.memories:
            raise ConfigError("memory", memory, sorted(self.memories))
        run.memory = copy.deepcopy(self.memories[memory])
        for key in EXTRA_FIELDS[:-1]:
            if fields.get(key) is not None:
                kind = field_kind(SamplingConfig, key)
                setattr(run.sampling, key, convert(f"sampling.{key}", fields[key], kind))
        if fields.get("size"):
            run.sampling.height, run.sampling.width = sizes.parse_size(fields["size"])
        if fields.get("seconds"):
            seconds = sizes.parse_seconds(fields["seconds"])
            fps = resolve_sampling(run.sampling, run.model).fps
            if isinstance(fps, int) and fps > 0:  # a bad fps is the check's to report
                multiple = get_spec(run.model.family).frames_multiple
                run.sampling.num_frames = sizes.frames_for(seconds, fps, multiple)
        run.output = dataclasses.replace(self.base.output, dir=str(self.videos), name=job_id, sidecar=True)
        return run

    def check(self, run: RunConfig) -> CheckedRun:
        """The command line's check of a run (validate_run: contentv.resolve.resolve_run), the only one before queueing;
        the worker's device makes its device decisions (memory=auto, VAE tiling) when the job runs."""
        return validate_run(run, self.backend)

    def admit(self, fields: dict[str, Any], job_id: str) -> Admitted:
        run = self.build(fields, job_id)
        s = self.check(run).sampling
        return Admitted(
            run=run,
            model=run.model.name,
            prompt=s.prompt,
            size=sizes.size_of(s.height, s.width),
            seconds=sizes.seconds_of(s.num_frames, s.fps),
            model_key=f"{run.model.name}/{run.memory.name}",
        )
