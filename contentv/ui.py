"""The web page: `python demo.py mode=ui` (needs the optional extra: pip install '.[ui]').

The community app's page, on this runtime: model preset (or a local checkpoint folder), prompt,
negative prompt, frames, fps, size, steps, guidance, seed (or random), backend and the memory options
(conf/memory presets, one offload mode, VAE slicing/tiling, attention slicing, INT8/NF4/FP8 weights;
"Predict memory" shows contentv.planner's table, and memory=auto shows it before running the preset it
picks). One generation runs at a time (the rest queue); the pipeline stays loaded while model, backend
and memory settings stay the same; Cancel stops after the current step and writes nothing. Bad input
gets the command line's one-line message, in the page, before anything is queued or loaded.

`Studio` holds the page's logic and needs no gradio (tests call it directly); `build_blocks` lays out
the page; `launch` serves it. The backend factory is injected (contentv never imports `backends`).
gradio is imported only inside functions, so the runtime works without it.
"""

# No `from __future__ import annotations` here: gradio finds its `gr.Request` argument through the
# handlers' evaluated type hints, and those hints name the lazily imported module.

import copy
import dataclasses
import html
import json
import logging
import random
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from contentv.config import BackendConfig, MemoryConfig, ModelConfig, RunConfig, SamplingConfig, resolve_sampling
from contentv.errors import ConfigError, GenerationCancelled
from contentv.runtime import Runtime, validate_run

log = logging.getLogger(__name__)

T = TypeVar("T")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# The page's offload radio: one mechanism at a time (diffusers can't stack them).
OFFLOAD_MODES = ("none", "model", "sequential", "group")
OFFLOAD_FLAGS = {"model": "model_cpu_offload", "sequential": "sequential_cpu_offload", "group": "group_offload"}
# memory.quantization values, labelled for the page (the backend rejects the ones it can't run).
QUANTIZATION_CHOICES = (
    ("none", "none"),
    ("INT8 (bitsandbytes)", "bnb_int8"),
    ("INT8 (torchao, weight-only)", "torchao_int8"),
    ("NF4 4-bit (bitsandbytes)", "bnb_nf4"),
    ("FP8 storage", "fp8"),
)
GALLERY_LIMIT = 24
# How long the Cancel button waits for the running step to end before it stops reporting.
CANCEL_WAIT_S = 600
# Fields filled from the chosen model's sampling_defaults when the model changes.
SAMPLING_FIELDS = ("negative_prompt", "num_frames", "fps", "width", "height", "num_inference_steps", "guidance_scale")
MEMORY_FIELDS = ("offload", "vae_slicing", "vae_tiling", "attention_slicing", "quantization", "budget_gb")


def _gradio():
    """Import gradio, or fail with one line saying how to install it."""
    try:
        import gradio
    except ImportError as exc:
        raise ConfigError("mode", "ui", "needs gradio: pip install '.[ui]'") from exc
    return gradio


def check_available() -> None:
    """Raise ConfigError (one line) if the page can't be served here (gradio missing)."""
    _gradio()


def host_warning(host: str) -> str | None:
    """The warning printed when the page listens beyond this machine, else None."""
    if host in LOCAL_HOSTS:
        return None
    return (
        f"warning: ui.host={host} serves the page (and generation on this machine's accelerator) to every "
        "network that can reach this interface, without authentication; the default is ui.host=127.0.0.1"
    )


def check_ui(cfg: RunConfig) -> None:
    """The ui.* settings, as ConfigError lines."""
    if not 0 <= cfg.ui.port <= 65535:
        raise ConfigError("ui.port", cfg.ui.port, "a TCP port in 0..65535")
    if cfg.ui.max_queue < 1:
        raise ConfigError("ui.max_queue", cfg.ui.max_queue, "an integer >= 1")
    if not cfg.ui.host:
        raise ConfigError("ui.host", cfg.ui.host, "an interface address such as 127.0.0.1")


# ---------------------------------------------------------------------------------------- presets


def _load_node(folder: Path, name: str, seen: tuple[str, ...] = ()):
    """One preset file as an OmegaConf node; a Hydra `defaults:` list of same-group presets is merged."""
    from omegaconf import OmegaConf

    if name in seen:
        raise ConfigError(f"{folder.name} preset {name}", "defaults", "no cycle in the defaults lists")
    node = OmegaConf.load(folder / f"{name}.yaml")
    defaults = node.pop("defaults", None) or []
    parts, self_done = [], False
    for entry in defaults:
        if entry == "_self_":
            parts.append(node)
            self_done = True
        elif isinstance(entry, str):
            parts.append(_load_node(folder, entry.split("/")[-1], (*seen, name)))
    if not self_done:  # Hydra's default: the file's own values last
        parts.append(node)
    return OmegaConf.merge(*parts) if parts else node


def load_presets(conf_dir: Path, group: str, schema: type[T]) -> dict[str, T]:
    """conf/<group>/*.yaml typed onto `schema`, by file name: exactly what the command line offers."""
    from omegaconf import OmegaConf

    folder = Path(conf_dir) / group
    out: dict[str, T] = {}
    for path in sorted(folder.glob("*.yaml")):
        try:
            node = OmegaConf.merge(OmegaConf.structured(schema), _load_node(folder, path.stem))
            out[path.stem] = OmegaConf.to_object(node)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - OmegaConf raises several types; all mean a bad preset file
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{group}={path.stem}", str(path), f"a {schema.__name__} preset ({first})") from exc
    return out


# ---------------------------------------------------------------------------------------- planner


def memory_plan(runtime: Runtime, cfg: RunConfig) -> tuple[str, MemoryConfig | None]:
    """The planner's table for `cfg` on this runtime's backend (every memory preset, no weights loaded)
    and the preset it chooses for memory=auto where a budget is known (the device's free memory or
    memory.budget_gb), else None. ConfigError when nothing fits."""
    from contentv.planner import format_plan

    plan = runtime.plan(cfg)
    chosen = copy.deepcopy(plan.chosen.memory) if plan.chosen is not None else None
    return format_plan(plan), chosen


def plan_markdown(text: str | None, title: str = "Memory plan") -> str:
    return "" if not text else f"**{title}**\n\n```\n{text}\n```"


# ---------------------------------------------------------------------------------------- the page's logic


@dataclass
class Form:
    """What the page sends: one field per input. Empty numbers (None) take the model's defaults."""

    prompt: str = ""
    negative_prompt: str | None = None
    model: str = "contentv_8b"
    # A local checkpoint folder (or hub id) replacing the preset's model.path; "" = the preset's.
    model_path: str = ""
    backend: str = "auto"
    num_frames: int | None = None
    fps: int | None = None
    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = 42
    random_seed: bool = False
    memory: str = "none"
    offload: str = "none"
    vae_slicing: bool = False
    vae_tiling: bool = False
    attention_slicing: int = 0
    quantization: str = "none"
    # memory=auto: the device memory to plan for, in GB (None = the preset's memory.budget_gb).
    budget_gb: float | None = None


@dataclass
class Outcome:
    """What the page shows after a generation (or a refusal)."""

    ok: bool
    status: str  # one line: "error: ...", "cancelled ...", or "done ..."
    video: Path | None = None
    sidecar: Path | None = None
    metadata: str = ""  # markdown: timings, peak memory, placement
    record: dict = field(default_factory=dict)
    reused: bool = False  # the loaded pipeline was reused (no weights loaded)


@dataclass(eq=False)
class Job:
    """A validated request: the exact config to run, whose page asked, and its cancel switch."""

    cfg: RunConfig
    session: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    plan: str | None = None  # the planner's table (memory=auto), shown before the run starts
    finished: threading.Event = field(default_factory=threading.Event)
    outcome: Outcome | None = None


def offload_mode(memory: MemoryConfig) -> str:
    """The radio value for a memory config (the first mechanism set wins)."""
    for mode, flag in OFFLOAD_FLAGS.items():
        if getattr(memory, flag):
            return mode
    return "none"


def _int(option: str, value: Any, allow_none: bool = True) -> int | None:
    """gradio numbers arrive as int or float; a fractional value is an error, not rounded."""
    if value is None or value == "":
        if allow_none:
            return None
        raise ConfigError(option, value, "an integer")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(option, value, "an integer") from None
    if not number.is_integer():
        raise ConfigError(option, value, "an integer")
    return int(number)


def _float(option: str, value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(option, value, "a number") from None


def one_line(exc: BaseException) -> str:
    """An unexpected exception as one line: its type and the first line of its message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def describe_result(record: dict, reused: bool, video: Path | None, sidecar: Path | None) -> str:
    """Markdown for the page: what ran, per-stage time, peak memory, where the files are."""
    cfg = record.get("config", {})
    s, m = cfg.get("sampling", {}), cfg.get("model", {})
    prepared = record.get("prepared", {})
    peak = record.get("peak_memory", {})
    device = record.get("device", {})
    timings = record.get("timings_s", {})
    stages = " · ".join(f"{k.replace('_', ' ')} {v:.2f} s" for k, v in timings.items())
    lines = [
        f"**{m.get('name')}** on **{device.get('backend')}** ({device.get('device')}) · seed **{record.get('seed')}**"
        f" · {s.get('width')}×{s.get('height')}, {s.get('num_frames')} frames at {s.get('fps')} fps"
        f" · {s.get('num_inference_steps')} steps, guidance {s.get('guidance_scale')}",
        f"**time:** {sum(timings.values()):.2f} s ({stages}; {record.get('seconds_per_step', 0):.3f} s/step)",
        f"**peak memory:** device {_gib(peak.get('device_bytes'))} · host RSS {_gib(peak.get('host_rss_bytes'))}",
        f"**pipeline:** {'reused (no weights loaded)' if reused else 'loaded'} · memory preset"
        f" {prepared.get('memory_preset')} · placement {prepared.get('placement')} · attention"
        f" {prepared.get('attention_kernel')} · quantization {prepared.get('quantization')}",
    ]
    if video is not None:
        lines.append(f"**video:** `{video}`" + (f" · **sidecar:** `{sidecar}`" if sidecar else ""))
    return "\n\n".join(lines)


class Studio:
    """The page's logic without gradio: presets, form -> validated config, generation, cancel, gallery.

    One `Runtime` per backend config (each caches its pipeline by (model, memory)), so weights load once
    while model, backend and memory settings stay the same; switching backend frees the others' pipelines.
    """

    def __init__(
        self,
        cfg: RunConfig,
        build_backend: Callable[[BackendConfig], Any],
        conf_dir: Path,
    ):
        self.base = copy.deepcopy(cfg)
        self.build_backend = build_backend
        self.conf_dir = Path(conf_dir)
        self.models: dict[str, ModelConfig] = load_presets(conf_dir, "model", ModelConfig)
        self.memories: dict[str, MemoryConfig] = load_presets(conf_dir, "memory", MemoryConfig)
        self.backends: dict[str, BackendConfig] = load_presets(conf_dir, "backend", BackendConfig)
        # The command line's choices (with its overrides) stand in for the preset files of the same name.
        self.models[cfg.model.name] = copy.deepcopy(cfg.model)
        self.memories[cfg.memory.name] = copy.deepcopy(cfg.memory)
        self.backends[cfg.backend.name] = copy.deepcopy(cfg.backend)
        # Videos from the page go to output.dir, else outputs/ui; the gallery shows every video under
        # output.dir, else outputs/ (so command-line runs in outputs/<date>/<time>/ appear too).
        self.gallery_dir = Path(cfg.output.dir or "outputs").absolute()
        self.output_dir = self.gallery_dir if cfg.output.dir else self.gallery_dir / "ui"
        self.runtimes: dict[str, Runtime] = {}
        self._runtimes_lock = threading.Lock()
        self._lock = threading.Lock()  # one generation at a time, whoever calls
        self._jobs: weakref.WeakSet[Job] = weakref.WeakSet()  # prepared, not yet finished
        self._jobs_lock = threading.Lock()

    # ------------------------------------------------------------ page defaults

    def defaults(self) -> Form:
        """The form as the page opens: the command line's composed config, model defaults filled in."""
        cfg = self.base
        s = resolve_sampling(cfg.sampling, cfg.model)
        m = cfg.memory
        return Form(
            prompt=s.prompt or "",
            negative_prompt=s.negative_prompt,
            model=cfg.model.name,
            model_path="",
            backend=cfg.backend.name,
            num_frames=s.num_frames,
            fps=s.fps,
            width=s.width,
            height=s.height,
            num_inference_steps=s.num_inference_steps,
            guidance_scale=s.guidance_scale,
            seed=s.seed,
            random_seed=False,
            memory=m.name,
            offload=offload_mode(m),
            vae_slicing=m.vae_slicing,
            vae_tiling=m.vae_tiling,
            attention_slicing=m.attention_slicing,
            quantization=m.quantization,
            budget_gb=m.budget_gb,
        )

    def sampling_defaults(self, model: str) -> dict[str, Any]:
        """The sampling fields the page refills when the model preset changes."""
        if model not in self.models:
            return {}
        d = self.models[model].sampling_defaults
        return {k: d[k] for k in SAMPLING_FIELDS if k in d}

    def memory_fields(self, memory: str) -> dict[str, Any]:
        """The memory widgets' values for a preset."""
        if memory not in self.memories:
            return {}
        m = self.memories[memory]
        return {
            "offload": offload_mode(m),
            "vae_slicing": m.vae_slicing,
            "vae_tiling": m.vae_tiling,
            "attention_slicing": m.attention_slicing,
            "quantization": m.quantization,
            "budget_gb": m.budget_gb,
        }

    # ------------------------------------------------------------ form -> config

    def config(self, form: Form) -> RunConfig:
        """The RunConfig the form asks for (ConfigError for a value the form itself can't express)."""
        base = self.base
        if form.model not in self.models:
            raise ConfigError("model", form.model, sorted(self.models))
        model = copy.deepcopy(self.models[form.model])
        path = (form.model_path or "").strip()
        if path:
            if model.tiny:
                raise ConfigError(
                    "model.path", path, f"empty for {form.model} (a tiny model is built in code); pick a real model"
                )
            model.path = path
        if form.backend not in self.backends:
            raise ConfigError("backend", form.backend, sorted(self.backends))
        backend = copy.deepcopy(self.backends[form.backend])
        memory = self.memory_config(form)

        seed = random.randrange(2**31) if form.random_seed else _int("sampling.seed", form.seed, allow_none=False)
        sampling = SamplingConfig(
            prompt=form.prompt,
            negative_prompt=form.negative_prompt,
            height=_int("sampling.height", form.height),
            width=_int("sampling.width", form.width),
            num_frames=_int("sampling.num_frames", form.num_frames),
            num_inference_steps=_int("sampling.num_inference_steps", form.num_inference_steps),
            guidance_scale=_float("sampling.guidance_scale", form.guidance_scale),
            fps=_int("sampling.fps", form.fps),
            seed=seed,
            # A command-line token limit applies to the model it was given for.
            max_sequence_length=base.sampling.max_sequence_length if model.name == base.model.name else None,
        )
        output = dataclasses.replace(base.output, dir=str(self.output_dir), name=None)
        return RunConfig(
            backend=backend,
            model=model,
            memory=memory,
            sampling=sampling,
            output=output,
            speedup=copy.deepcopy(base.speedup),
            ui=copy.deepcopy(base.ui),
            mode="generate",
            dry_run=False,
            debug=base.debug,
        )

    def memory_config(self, form: Form) -> MemoryConfig:
        """The chosen memory preset with the page's widgets applied on top."""
        if form.memory not in self.memories:
            raise ConfigError("memory", form.memory, sorted(self.memories))
        memory = copy.deepcopy(self.memories[form.memory])
        if form.offload not in OFFLOAD_MODES:
            raise ConfigError("offload", form.offload, OFFLOAD_MODES)
        if form.offload != offload_mode(memory):
            # The preset's text-encoder placement was chosen for its own offload mode; let the backend
            # pick the one that goes with the page's (auto: offload / release / device).
            memory.text_encoders = "auto"
        for mode, flag in OFFLOAD_FLAGS.items():
            setattr(memory, flag, form.offload == mode)
        memory.vae_slicing = bool(form.vae_slicing)
        memory.vae_tiling = bool(form.vae_tiling)
        memory.attention_slicing = _int("memory.attention_slicing", form.attention_slicing, allow_none=False)
        memory.quantization = form.quantization
        if form.budget_gb is not None and form.budget_gb != "":
            memory.budget_gb = _float("memory.budget_gb", form.budget_gb)
        return memory

    # ------------------------------------------------------------ backends and runtimes

    def runtime(self, backend_cfg: BackendConfig) -> Runtime:
        """The Runtime for this backend config, built (and its backend set up) on first use."""
        key = repr(backend_cfg)
        with self._runtimes_lock:  # checks run unqueued, side by side with a generation
            if key not in self.runtimes:
                backend = self.build_backend(backend_cfg)
                backend.setup()
                self.runtimes[key] = Runtime(backend, conf_dir=self.conf_dir)
            return self.runtimes[key]

    def preflight(self, cfg: RunConfig) -> Runtime:
        """Every check the command line makes before loading anything; ConfigError on the first failure."""
        validate_run(cfg)
        runtime = self.runtime(cfg.backend)
        runtime.backend.attention_kernel()  # an unknown or uninstalled kernel fails here
        if cfg.memory.name != "auto":  # auto: the planner checks each preset it considers
            runtime.backend.check_memory(cfg.memory)
        return runtime

    def plan(self, form: Form) -> str:
        """The planner's table for the form's settings (ConfigError for a bad form or nothing fitting).

        Needs no prompt and no local checkpoint (the planner sizes the model from its configs).
        """
        cfg = self.config(form)
        text, _ = memory_plan(self.runtime(cfg.backend), cfg)
        return text

    # ------------------------------------------------------------ generation

    def resolve(self, form: Form) -> tuple[RunConfig, str | None]:
        """The checked config to run and, for memory=auto, the planner's table (ConfigError on a bad form).

        memory=auto runs the preset the planner chooses (shown before the run); where no budget is
        known the runtime decides, as for the command line.
        """
        cfg = self.config(form)
        runtime = self.preflight(cfg)
        if cfg.memory.name != "auto":
            return cfg, None
        plan, chosen = memory_plan(runtime, cfg)
        if chosen is not None:
            cfg.memory = chosen
            self.preflight(cfg)
        return cfg, plan

    def prepare(self, form: Form, session: str | None = None) -> tuple[Job | None, str]:
        """Validate the form without loading anything: (job, "") or (None, the command line's error line)."""
        try:
            cfg, plan = self.resolve(form)
        except ConfigError as exc:
            return None, f"error: {exc}"
        except Exception as exc:  # noqa: BLE001 - e.g. a planner bug: one line in the page, traceback in the log
            log.exception("checking the form failed")
            return None, f"error: {one_line(exc)}"
        job = Job(cfg=cfg, session=session, plan=plan)
        with self._jobs_lock:
            self._jobs.add(job)
        return job, ""

    def busy(self) -> bool:
        """A generation is running."""
        return self._lock.locked()

    def cancel_jobs(self, session: str | None = None) -> list[Job]:
        """Cancel this page's prepared jobs (every job when session is None) and return them.

        A running job stops after its current denoising step and writes nothing; `job.finished` is set
        once it has stopped, with the line to show in `job.outcome.status`.
        """
        with self._jobs_lock:
            jobs = [j for j in self._jobs if session is None or j.session == session]
        for job in jobs:
            job.cancelled.set()
        return jobs

    def cancel(self, session: str | None = None) -> int:
        """Cancel this page's prepared jobs (all when session is None); returns how many."""
        return len(self.cancel_jobs(session))

    def generate(self, job: Job, progress: Callable[[int, int, str], None] | None = None) -> Outcome:
        """Run a prepared job (waiting for any running one); progress(step, total, text) after each step."""
        try:
            with self._lock:
                if job.cancelled.is_set():
                    job.outcome = Outcome(False, "cancelled before it started: no video written")
                else:
                    job.outcome = self._run(job, progress)
                return job.outcome
        finally:
            with self._jobs_lock:
                self._jobs.discard(job)
            job.finished.set()

    def _run(self, job: Job, progress: Callable[[int, int, str], None] | None) -> Outcome:
        cfg = job.cfg
        try:
            runtime = self.preflight(cfg)  # again: the device or files may have changed while queued
            _, sampling = validate_run(cfg)
        except ConfigError as exc:
            return Outcome(False, f"error: {exc}")
        with self._runtimes_lock:
            others = [r for r in self.runtimes.values() if r is not runtime]
        for other in others:
            other.release()  # one loaded pipeline at a time
        total = sampling.num_inference_steps
        loads = runtime.loads
        start = time.perf_counter()
        marks: list[float] = []

        def on_step_end(pipe, i, t, tensors):
            marks.append(time.perf_counter())
            done = i + 1
            if len(marks) > 1:  # per-step time from step ends (the first includes loading and encoding)
                per_step = (marks[-1] - marks[0]) / (len(marks) - 1)
                text = f"step {done}/{total} · {per_step:.2f} s/step · ~{per_step * (total - done):.0f} s left"
            else:
                text = f"step {done}/{total} · estimating time left"
            if progress is not None:
                progress(done, total, text)
            if job.cancelled.is_set():
                pipe._interrupt = True  # the pipeline raises GenerationCancelled after this step
            return {}

        if progress is not None:
            progress(0, total, "preparing: loading weights if model, backend or memory changed; encoding prompt")
        try:
            result = runtime.run(cfg, callback_on_step_end=on_step_end)
        except GenerationCancelled as exc:
            return Outcome(False, f"{exc}: no video written")
        except ConfigError as exc:
            return Outcome(False, f"error: {exc}")
        except Exception as exc:  # noqa: BLE001 - the page shows one line and keeps serving
            log.exception("generation failed")
            return Outcome(False, f"error: {one_line(exc)}")
        reused = runtime.loads == loads
        seconds = time.perf_counter() - start
        return Outcome(
            ok=True,
            status=f"done in {seconds:.1f} s: {result.video.name}",
            video=result.video,
            sidecar=result.sidecar,
            metadata=describe_result(result.record, reused, result.video, result.sidecar),
            record=result.record,
            reused=reused,
        )

    # ------------------------------------------------------------ gallery

    def gallery(self, limit: int = GALLERY_LIMIT) -> list[tuple[str, str]]:
        """(video path, caption) of the newest videos under the output folder, newest first."""
        root = self.gallery_dir
        if not root.is_dir():
            return []
        videos = [p for p in root.rglob("*.mp4") if not p.name.startswith(".")]
        videos.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        out = []
        for video in videos[:limit]:
            caption = video.stem
            sidecar = video.with_suffix(".json")
            if sidecar.is_file():
                try:
                    record = json.loads(sidecar.read_text())
                    caption = f"{record.get('prompt', '')[:80]} (seed {record.get('seed')})"
                except (OSError, ValueError):
                    pass
            out.append((str(video), caption))
        return out


# ---------------------------------------------------------------------------------------- the page

CSS = """
.cv-status { padding: 0.6em 0.9em; border-radius: 6px; font-family: ui-monospace, monospace; }
.cv-status.error { background: #fdecea; color: #8a1c12; border: 1px solid #f5c2bd; }
.cv-status.info { background: #eef4fb; color: #1d3f66; border: 1px solid #c9dbef; }
"""


def status_html(text: str) -> str:
    """A one-line status box (errors in red); empty text clears it."""
    if not text:
        return ""
    kind = "error" if text.startswith("error:") else "info"
    return f'<div class="cv-status {kind}" role="status">{html.escape(text)}</div>'


def build_blocks(studio: Studio):
    """Lay out the page and wire its events; returns the gradio Blocks (not yet served)."""
    gr = _gradio()
    d = studio.defaults()
    backend_choices = sorted(studio.backends)

    with gr.Blocks(title="ContentV", analytics_enabled=False) as blocks:
        gr.Markdown("# ContentV text-to-video")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(d.prompt, label="Prompt", lines=3, elem_id="prompt")
                negative = gr.Textbox(d.negative_prompt or "", label="Negative prompt", lines=2, elem_id="negative")
                with gr.Row():
                    model = gr.Dropdown(sorted(studio.models), value=d.model, label="Model preset", elem_id="model")
                    model_path = gr.Textbox(
                        "",
                        label="Local checkpoint folder (optional)",
                        placeholder="replaces the preset's model.path, e.g. /ckpt/ContentV-8B",
                        elem_id="model_path",
                    )
                    backend = gr.Dropdown(backend_choices, value=d.backend, label="Backend", elem_id="backend")
                with gr.Row():
                    frames = gr.Number(d.num_frames, label="Frames (4k+1)", precision=0, elem_id="frames")
                    fps = gr.Number(d.fps, label="FPS", precision=0, elem_id="fps")
                    width = gr.Number(d.width, label="Width (×16)", precision=0, elem_id="width")
                    height = gr.Number(d.height, label="Height (×16)", precision=0, elem_id="height")
                with gr.Row():
                    steps = gr.Number(d.num_inference_steps, label="Steps", precision=0, elem_id="steps")
                    guidance = gr.Number(d.guidance_scale, label="Guidance", elem_id="guidance")
                    seed = gr.Number(d.seed, label="Seed", precision=0, elem_id="seed")
                    random_seed = gr.Checkbox(d.random_seed, label="Random seed", elem_id="random_seed")
                with gr.Accordion("Memory", open=False):
                    memory = gr.Dropdown(sorted(studio.memories), value=d.memory, label="Preset", elem_id="memory")
                    offload = gr.Radio(
                        list(OFFLOAD_MODES),
                        value=d.offload,
                        label="CPU offload (one at a time; model is faster, sequential uses least memory)",
                        elem_id="offload",
                    )
                    with gr.Row():
                        vae_slicing = gr.Checkbox(d.vae_slicing, label="VAE slicing", elem_id="vae_slicing")
                        vae_tiling = gr.Checkbox(d.vae_tiling, label="VAE tiling", elem_id="vae_tiling")
                    with gr.Row():
                        attention_slicing = gr.Number(
                            d.attention_slicing,
                            label="Attention slicing (query chunk, 0 = off)",
                            precision=0,
                            minimum=0,
                            elem_id="attention_slicing",
                        )
                        quantization = gr.Dropdown(
                            list(QUANTIZATION_CHOICES),
                            value=d.quantization,
                            label="Weights",
                            allow_custom_value=True,
                            elem_id="quantization",
                        )
                    with gr.Row():
                        budget = gr.Number(
                            d.budget_gb,
                            label="Budget GB (memory=auto)",
                            info="the planner runs the fastest preset predicted to fit",
                            minimum=0,
                            elem_id="budget_gb",
                        )
                        predict_btn = gr.Button("Predict memory", size="sm", elem_id="predict")
                with gr.Row():
                    run_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
            with gr.Column(scale=3):
                status = gr.HTML("", elem_id="status")
                video = gr.Video(label="Video", interactive=False, autoplay=True, loop=True, elem_id="video")
                info = gr.Markdown("", elem_id="info")
                files = gr.File(label="Download", file_count="multiple", interactive=False, elem_id="download")
                plan = gr.Markdown("", elem_id="plan")
        with gr.Row():
            gr.Markdown(f"### Earlier videos in `{studio.gallery_dir}`")
            refresh = gr.Button("Refresh", size="sm", scale=0, elem_id="refresh")
        gallery = gr.Gallery(
            studio.gallery(), label="Outputs", columns=4, fit_columns=False, height=420, elem_id="gallery"
        )

        widgets = {
            "prompt": prompt,
            "negative_prompt": negative,
            "model": model,
            "model_path": model_path,
            "backend": backend,
            "num_frames": frames,
            "fps": fps,
            "width": width,
            "height": height,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "seed": seed,
            "random_seed": random_seed,
            "memory": memory,
            "offload": offload,
            "vae_slicing": vae_slicing,
            "vae_tiling": vae_tiling,
            "attention_slicing": attention_slicing,
            "quantization": quantization,
            "budget_gb": budget,
        }
        # A set of inputs: each handler gets one {component: value} dict (and gradio can still inject
        # request/progress, which it finds only among positional parameters).
        inputs = set(widgets.values())
        sampling_outputs = [negative, frames, fps, width, height, steps, guidance]
        memory_outputs = [offload, vae_slicing, vae_tiling, attention_slicing, quantization, budget]

        def form_of(data: dict) -> Form:
            return Form(**{name: data[w] for name, w in widgets.items()})

        def on_model(name):
            values = studio.sampling_defaults(name)
            return [gr.update(value=values[k]) if k in values else gr.update() for k in SAMPLING_FIELDS]

        def on_memory(name):
            values = studio.memory_fields(name)
            return [gr.update(value=values[k]) if k in values else gr.update() for k in MEMORY_FIELDS]

        def on_predict(data):
            try:
                return plan_markdown(studio.plan(form_of(data)))
            except ConfigError as exc:
                return plan_markdown(f"error: {exc}")
            except Exception as exc:  # noqa: BLE001 - one line in the page, traceback in the log
                log.exception("memory plan failed")
                return plan_markdown(f"error: {one_line(exc)}")

        def on_auto_plan(data):  # shown by itself only for memory=auto
            return on_predict(data) if data[memory] == "auto" else ""

        def on_check(data):
            # Runs at once (not queued): a bad form is answered here, before anything waits or loads.
            try:
                cfg, plan_text = studio.resolve(form_of(data))
            except ConfigError as exc:
                return status_html(f"error: {exc}"), gr.skip()
            except Exception as exc:  # noqa: BLE001 - one line in the page, traceback in the log
                log.exception("checking the form failed")
                return status_html(f"error: {one_line(exc)}"), gr.skip()
            waiting = "queued: waiting for the generation in progress" if studio.busy() else "starting"
            if plan_text is None:
                return status_html(waiting), gr.skip()
            return status_html(f"{waiting} (memory=auto: {cfg.memory.name})"), plan_markdown(plan_text)

        def on_run(data, request: gr.Request, progress=gr.Progress()):  # noqa: B008 - found by its default
            job, _ = studio.prepare(form_of(data), session=getattr(request, "session_hash", None))
            if job is None:  # on_check has already shown the message
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            plan_md = plan_markdown(job.plan, f"Memory plan (memory=auto ran {job.cfg.memory.name})") or gr.skip()
            outcome = studio.generate(job, lambda i, n, text: progress((i, n), desc=text, unit="steps"))
            if not outcome.ok:
                return status_html(outcome.status), gr.skip(), gr.skip(), gr.skip(), gr.skip(), plan_md
            downloads = [str(p) for p in (outcome.video, outcome.sidecar) if p is not None]
            return (
                status_html(outcome.status),
                str(outcome.video),
                outcome.metadata,
                downloads,
                studio.gallery(),
                plan_md,
            )

        def on_cancel(request: gr.Request):
            # gradio drops this page's queued runs (cancels=) and stops showing its running one; the
            # Studio stops that one after its current step. Wait for it, to show how it ended.
            jobs = studio.cancel_jobs(getattr(request, "session_hash", None))
            if not jobs:
                yield status_html("cancelled: nothing of this page was running (a queued generation is dropped)")
                return
            yield status_html("cancelling: stops after the current step; no video is written")
            for job in jobs:
                job.finished.wait(CANCEL_WAIT_S)
            ended = [j.outcome.status for j in jobs if j.outcome is not None]
            if ended:
                yield status_html(ended[-1])

        model.change(on_model, [model], sampling_outputs, queue=False)
        memory.change(on_memory, [memory], memory_outputs, queue=False).then(on_auto_plan, inputs, [plan], queue=False)
        predict_btn.click(on_predict, inputs, [plan], queue=False)
        # Check at once, then queue the run (one at a time, at most ui.max_queue waiting). The run
        # re-validates: the form is read again when its turn comes.
        running = run_btn.click(on_check, inputs, [status, plan], queue=False).then(
            on_run,
            inputs,
            [status, video, info, files, gallery, plan],
            concurrency_limit=1,
            concurrency_id="generate",
            show_progress="full",
            show_progress_on=[video],
        )
        # Drops this page's queued runs (gradio) and stops its running one after the current step (Studio).
        cancel_btn.click(on_cancel, None, [status], cancels=[running], concurrency_limit=None, concurrency_id="cancel")
        refresh.click(studio.gallery, None, [gallery], queue=False)
        blocks.load(on_auto_plan, inputs, [plan], queue=False)
    return blocks


@dataclass
class Server:
    """A running page: its URL, the gradio Blocks and the Studio behind it; `close()` stops it."""

    blocks: Any
    studio: Studio
    url: str

    def close(self) -> None:
        self.blocks.close(verbose=False)


def launch(cfg: RunConfig, build_backend: Callable[[BackendConfig], Any], conf_dir: Path, block: bool = True) -> Server:
    """Serve the page on cfg.ui.host:cfg.ui.port; returns the running server (after Ctrl-C when block).

    `build_backend` makes a backend from a BackendConfig (demo.py passes backends.build_backend);
    `conf_dir` holds the presets the page offers (conf/model, conf/memory, conf/backend).
    """
    gr = _gradio()
    check_ui(cfg)
    warning = host_warning(cfg.ui.host)
    if warning:
        print(warning, file=sys.stderr)
    # gradio checks its own URL over HTTP at start; those request lines are noise in our log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    studio = Studio(cfg, build_backend, conf_dir)
    studio.output_dir.mkdir(parents=True, exist_ok=True)
    blocks = build_blocks(studio)
    blocks.queue(max_size=cfg.ui.max_queue, default_concurrency_limit=1)
    blocks.launch(
        server_name=cfg.ui.host,
        server_port=cfg.ui.port,
        prevent_thread_lock=True,
        share=False,
        inbrowser=False,
        show_error=True,
        quiet=True,
        ssr_mode=False,
        mcp_server=False,
        allowed_paths=[str(studio.gallery_dir)],
        # System fonts: the page never reaches out to a font service (it works offline).
        theme=gr.themes.Default(
            font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
        ),
        css=CSS,
    )
    server = Server(blocks=blocks, studio=studio, url=blocks.local_url)
    print(f"ContentV page on {server.url} (Ctrl-C to stop)", file=sys.stderr)
    if block:
        try:
            blocks.block_thread()
        finally:
            server.close()
    return server
