"""The web page's logic without gradio: form <-> config, one validated job at a time, queue limits, cancel.

`Studio` is what `contentv/ui.py` (the gradio page) calls, and what tests drive directly. The page's inputs
are config fields: each `Form` field names the option it sets, and its conversion (integer, number, text,
switch) comes from that option's type in contentv/config.py, so the page and the command line accept the
same values and report bad ones with the same line. Presets (model, memory, backend) are the ones the entry
point composed (Hydra); the backend factory is injected (contentv never imports `backends`).

Jobs are durable (contentv.jobqueue): admitted into `<output dir>/ui-jobs.sqlite3` with the resolved run's config,
run one at a time in arrival order by the thread that asked (the page's /generate call) or, for a job nobody waits
for (found after a restart, or dropped by its caller), by the Studio's runner thread.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contentv.config import (
    BackendConfig,
    MemoryConfig,
    Presets,
    RunConfig,
    SamplingConfig,
    resolve_sampling,
)
from contentv.errors import ConfigError, GenerationCancelled, first_line
from contentv.folder_lock import lock_queue
from contentv.form import (
    MEMORY_FIELDS,
    MODEL_DEFAULT_FIELDS,
    OFFLOAD_FLAGS,
    OFFLOAD_MODES,
    SAMPLING_FIELDS,
    VAE_TILING,
    Form,
    convert,
    field_kind,
    frames_label,
    offload_mode,
    page_memory_fields,
)
from contentv.jobqueue import JOBS_FILE, LOCK_FILE, Job, JobQueue, jobs_html
from contentv.resolve import ResolvedRun
from contentv.runtime import Runtime
from contentv.serve.store import Store, new_id
from contentv.served import GALLERY_LIMIT, ServedFiles
from contentv.sidecar import describe_result
from contentv.validation import is_hub_id

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

log = logging.getLogger(__name__)


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


# ---------------------------------------------------------------------------------------- studio


class Studio:
    """Presets, form -> validated config, generation one at a time, cancel, gallery.

    One `Runtime` per backend config (each caches its pipeline by (model, memory)), so weights load once
    while model, backend and memory settings stay the same; switching backend frees the others' pipelines.
    """

    def __init__(self, cfg: RunConfig, presets: Presets, build_backend: Callable[[BackendConfig], Any]):
        self.base = copy.deepcopy(cfg)
        self.build_backend = build_backend
        self.models = dict(copy.deepcopy(presets.models))
        self.memories = dict(copy.deepcopy(presets.memories))
        self.backends = dict(copy.deepcopy(presets.backends))
        # The command line's choices (with its overrides) stand in for the presets of the same name.
        self.models[cfg.model.name] = copy.deepcopy(cfg.model)
        self.memories[cfg.memory.name] = copy.deepcopy(cfg.memory)
        self.backends[cfg.backend.name] = copy.deepcopy(cfg.backend)
        # Only these folders (or hub ids) may replace a preset's model.path from the page, spelled as offered or
        # as configured; nothing else is looked up (the answer never depends on what exists on the server).
        self.allowed: dict[str, str] = {}  # spelling -> the model.path it loads
        for p in cfg.ui.allowed_paths:
            path = p.strip() if is_hub_id(p.strip()) else _folder(p)
            self.allowed[p] = self.allowed[p.strip()] = self.allowed[path] = path
        self.allowed_paths = tuple(dict.fromkeys(self.allowed.values()))
        # Videos from the page go to output.dir, else outputs/ui; the gallery shows every video under
        # output.dir, else outputs/ (so command-line runs in outputs/<date>/<time>/ appear too).
        self.gallery_dir = Path(cfg.output.dir or "outputs").absolute()
        self.output_dir = self.gallery_dir if cfg.output.dir else self.gallery_dir / "ui"
        # One page per queue, taken before the queue is opened: a second page here would re-queue this one's running
        # job and run jobs too (ConfigError on output.dir, naming the page that holds it; released by close()).
        self.lock = lock_queue(self.output_dir, LOCK_FILE, "page", JOBS_FILE)
        try:
            self._open(cfg)
        except BaseException:
            self.lock.release()
            raise

    def _open(self, cfg: RunConfig) -> None:
        # The only files the page serves: links to videos and sidecars in a private folder.
        self.files = ServedFiles(self.gallery_dir)
        self.serve_dir = self.files.dir
        self.runtimes: dict[str, Runtime] = {}
        self._runtimes_lock = threading.Lock()
        # One generation at a time, in arrival order, with a share per client (ui.max_queue_per_client); the queue of
        # record is a SQLite file in the output folder, so a restarted page finds every job admitted before.
        self.queue = JobQueue(Store(self.output_dir / JOBS_FILE), cfg.ui.max_queue, cfg.ui.max_queue_per_client)
        for outcome, ids in self.queue.recover(self.output_dir).items():
            if ids:
                log.warning("after a restart, %d interrupted page job(s) %s: %s", len(ids), outcome, ", ".join(ids))
        # Runs the jobs no page waits for (found after a restart, or whose caller went away).
        self._closed = threading.Event()
        self._runner = threading.Thread(target=self._run_orphans, name="page-runner", daemon=True)
        self._runner.start()

    # ------------------------------------------------------------ page defaults

    def defaults(self) -> Form:
        """The form as the page opens: the command line's composed config, model defaults filled in."""
        cfg = self.base
        s = resolve_sampling(cfg.sampling, cfg.model)
        m = cfg.memory
        return Form(
            model=cfg.model.name,
            backend=cfg.backend.name,
            memory=m.name,
            offload=offload_mode(m),
            sampling={k: getattr(s, k) for k in SAMPLING_FIELDS},
            memory_fields=page_memory_fields(m),
        )

    def sampling_defaults(self, model: str) -> dict[str, Any]:
        """The sampling fields the page refills when the model preset changes."""
        if not isinstance(model, str) or model not in self.models:
            return {}
        d = resolve_sampling(SamplingConfig(), self.models[model])
        return {k: getattr(d, k) for k in MODEL_DEFAULT_FIELDS}

    def model_widgets(self, model: str) -> dict[str, dict[str, Any]]:
        """What the page updates when the model preset changes: {field: {"value": default, "label": ...}}."""
        updates = {k: {"value": v} for k, v in self.sampling_defaults(model).items()}
        updates.setdefault("num_frames", {})["label"] = self.frames_label(model)
        return updates

    def frames_label(self, model: str) -> str:
        """The frames widget's label for a model preset: its family's frame rule ("Frames (8k+1)" for CogVideoX)."""
        cfg = self.models.get(model) if isinstance(model, str) else None
        return frames_label(cfg.family) if cfg is not None else "Frames"

    def memory_fields(self, memory: str) -> dict[str, Any]:
        """The memory widgets' values for a preset (the offload radio included)."""
        if not isinstance(memory, str) or memory not in self.memories:
            return {}
        m = self.memories[memory]
        return {"offload": offload_mode(m), **page_memory_fields(m)}

    # ------------------------------------------------------------ form -> config

    def config(self, form: Form) -> RunConfig:
        """The RunConfig the form asks for (ConfigError for a value the form itself can't express)."""
        base = self.base
        model = copy.deepcopy(_preset("model", form.model, self.models))
        path = str(form.model_path or "").strip()
        if path:
            # Refused before the file system is touched: the answer must not reveal what exists on the server.
            if path not in self.allowed:
                allowed = ", ".join(self.allowed_paths) or "none were allowed at launch"
                raise ConfigError("model.path", path, f"one of the folders in ui.allowed_paths ({allowed})")
            if model.tiny:
                raise ConfigError("model.path", path, f"empty for {form.model} (a tiny model is built in code)")
            model.path = self.allowed[path]
        backend = copy.deepcopy(_preset("backend", form.backend, self.backends))
        memory = self.memory_config(form)
        values = {
            k: convert(f"sampling.{k}", form.sampling.get(k), field_kind(SamplingConfig, k)) for k in form.sampling
        }
        unknown = sorted(set(values) - set(SAMPLING_FIELDS))
        if unknown:
            raise ConfigError(
                f"sampling.{unknown[0]}", values[unknown[0]], f"one of the page's fields: {SAMPLING_FIELDS}"
            )
        if convert("random_seed", form.random_seed, bool):
            values["seed"] = random.randrange(2**31)
        elif values.get("seed") is None:
            raise ConfigError("sampling.seed", form.sampling.get("seed"), "an integer (or tick Random seed)")
        values["prompt"] = values.get("prompt") or ""
        # A command-line token limit applies to the model it was given for.
        values["max_sequence_length"] = base.sampling.max_sequence_length if model.name == base.model.name else None
        output = dataclasses.replace(base.output, dir=str(self.output_dir), name=None)
        return RunConfig(
            backend=backend,
            model=model,
            memory=memory,
            sampling=SamplingConfig(**values),
            output=output,
            speedup=copy.deepcopy(base.speedup),
            ui=copy.deepcopy(base.ui),
            mode="generate",
            dry_run=False,
            debug=base.debug,
        )

    def memory_config(self, form: Form) -> MemoryConfig:
        """The chosen memory preset with the page's widgets applied on top."""
        memory = copy.deepcopy(_preset("memory", form.memory, self.memories))
        if form.offload not in OFFLOAD_MODES:
            raise ConfigError("offload", form.offload, OFFLOAD_MODES)
        if form.offload != offload_mode(memory):
            # The preset's text-encoder placement was chosen for its own offload mode; let the backend
            # pick the one that goes with the page's (auto: offload / release / device).
            memory.text_encoders = "auto"
        for mode, flag in OFFLOAD_FLAGS.items():
            setattr(memory, flag, form.offload == mode)
        for name, value in form.memory_fields.items():
            if name not in MEMORY_FIELDS:
                raise ConfigError(f"memory.{name}", value, f"one of the page's fields: {MEMORY_FIELDS}")
            if name == "vae_tiling" and not isinstance(value, bool):  # the page's choice; API callers may send bools
                if value not in VAE_TILING:
                    raise ConfigError("memory.vae_tiling", value, f"one of {', '.join(VAE_TILING)} (or true/false)")
                value = VAE_TILING[value]
            converted = convert(f"memory.{name}", value, field_kind(MemoryConfig, name))
            if converted is not None or name in ("budget_gb", "vae_tiling"):
                setattr(memory, name, converted)
        return memory

    # ------------------------------------------------------------ backends and runtimes

    def runtime(self, backend_cfg: BackendConfig) -> Runtime:
        """The Runtime for this backend config, built (and its backend set up) on first use."""
        key = repr(backend_cfg)
        with self._runtimes_lock:  # checks run unqueued, side by side with a generation
            if key not in self.runtimes:
                self.runtimes[key] = Runtime(self.build_backend(backend_cfg), presets=self.memories)
            return self.runtimes[key]

    def preflight(self, cfg: RunConfig) -> ResolvedRun:
        """The command line's pre-flight check and decisions (contentv.resolve) on this form's backend."""
        return self.runtime(cfg.backend).resolve(cfg)

    def plan(self, form: Form) -> str:
        """The planner's table for the form's settings (ConfigError for a bad form or nothing fitting).

        Needs no prompt and no local checkpoint (the planner sizes the model from its configs).
        """
        from contentv.planner import format_plan

        cfg = self.config(form)
        return format_plan(self.runtime(cfg.backend).plan(cfg))

    # ------------------------------------------------------------ generation

    def resolve(self, form: Form) -> tuple[ResolvedRun, str | None]:
        """The resolved run (checked, memory decided) and, for memory=auto, the planner's table (ConfigError on a
        bad form). memory=auto runs the preset the planner chose, shown before the run."""
        run = self.preflight(self.config(form))
        return run, (run.plan_text or None) if run.requested_memory == "auto" else None

    def pending(self, session: str | None) -> int:
        """Jobs of this page waiting or running."""
        return self.queue.pending(session)

    def refusal(self, session: str | None = None, client: str | None = None) -> str | None:
        """Why a job from this browser session and network address can't be queued now (one line), or None."""
        return self.queue.refusal(session, client)

    def prepare(self, form: Form, session: str | None = None, client: str | None = None) -> tuple[Job | None, str]:
        """Validate the form without loading anything and queue the job: (job, "") or (None, one error line).

        Refused first if this session or address already has its share of the queue or the queue is full
        (contentv.jobqueue), then by the command line's checks and decisions (contentv.resolve.resolve_run).
        """
        refused = self.queue.refusal(session, client)
        if refused:
            return None, refused
        try:
            run, plan = self.resolve(form)
        except ConfigError as exc:
            return None, f"error: {exc}"
        except Exception as exc:  # noqa: BLE001 - e.g. a planner bug: one line in the page, traceback in the log
            log.exception("checking the form failed")
            return None, f"error: {first_line(exc, with_type=True)}"
        job_id = new_id()
        run = dataclasses.replace(run, invocation=_invocation(job_id))  # the sidecar names its job (recovery)
        job = Job(cfg=run.config(), run=run, session=session, client=client, plan=plan, id=job_id)
        refused = self.queue.admit(job)  # committed to the store, unless others filled the queue meanwhile
        return (None, refused) if refused else (job, "")

    def busy(self) -> bool:
        """A generation is running."""
        return self.queue.busy()

    def cancel_jobs(self, session: str | None = None) -> list[Job]:
        """Cancel this page's prepared jobs (every job when session is None) and return them.

        A waiting job leaves the queue at once; a running job stops after its current denoising step and writes
        nothing. `job.finished` is set once it has stopped, with the line to show in `job.outcome.status`.
        """
        return self.queue.cancel(session)

    def cancel(self, session: str | None = None) -> int:
        """Cancel this page's prepared jobs (all when session is None); returns how many."""
        return len(self.cancel_jobs(session))

    def generate(self, job: Job, progress: Callable[[int, int, str], None] | None = None) -> Outcome:
        """Run a prepared job when its turn comes (first come, first served); progress(step, total, text)
        while it waits and after each step."""
        total = job.run.sampling.num_inference_steps or 0

        def waiting(ahead: int) -> None:
            if progress is not None:
                progress(0, total, f"queued: {ahead} generation{'s' if ahead > 1 else ''} ahead")

        try:
            if self.queue.wait_turn(job, waiting):
                job.outcome = self._run(job, progress)
            else:
                job.outcome = Outcome(False, "cancelled before it started: no video written")
            return job.outcome
        finally:
            self.queue.done(job, job.outcome)
            self._release_if_idle()

    def _run_orphans(self) -> None:
        """The runner thread: jobs no caller waits for, when their turn comes."""
        while not self._closed.is_set():
            taken = self.queue.next_orphan(timeout=1.0)
            if taken is None:
                continue
            job, row = taken
            try:
                job.outcome = self._run_stored(job, row)
            finally:
                self.queue.done(job, job.outcome)
                self._release_if_idle()

    def _run_stored(self, job: Job, row: dict) -> Outcome:
        """A job from the store: its config is the resolved run's, checked again on this backend (contentv.resolve:
        the decisions come out as before) and run; a model path this page no longer offers is refused."""
        from contentv.serve.workers import run_from_dict

        try:
            cfg = run_from_dict(json.loads(row["run"]))
            preset = self.models.get(cfg.model.name)
            if cfg.model.path not in (getattr(preset, "path", None), *self.allowed_paths):
                raise ConfigError("model.path", cfg.model.path, "a checkpoint this page offers (ui.allowed_paths)")
            run = self.preflight(cfg)
        except ConfigError as exc:
            return Outcome(False, f"error: {exc}")
        except Exception as exc:  # noqa: BLE001 - e.g. a row from another version: that job fails, the page serves on
            log.exception("page job %s could not be read back", job.id)
            return Outcome(False, f"error: {first_line(exc, with_type=True)}")
        job.run = dataclasses.replace(run, invocation=_invocation(job.id))
        job.cfg = job.run.config()
        return self._run(job, None)

    def _run(self, job: Job, progress: Callable[[int, int, str], None] | None) -> Outcome:
        run = job.run  # checked and decided when the job was queued; trusted now
        runtime = self.runtime(run.config().backend)
        # A page job's start-up is its own (loading, releasing another model), not the server's idle time since it
        # started: the runtime counts its first video's start-up from here.
        runtime.started_at = time.time()
        sampling = run.sampling
        with self._runtimes_lock:
            others = [r for r in self.runtimes.values() if r is not runtime]
        for other in others:
            other.release()  # one loaded pipeline at a time
        total = sampling.num_inference_steps
        loads = runtime.loads
        start = time.perf_counter()
        marks: list[float] = []

        def on_step_end(pipe: DiffusionPipeline, i: int, t: torch.Tensor, tensors: dict) -> dict:
            marks.append(time.perf_counter())
            done = i + 1
            self.queue.progress(job, min(99, int(100 * done / total)))  # the page's table
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
            result = runtime.run(run, callback_on_step_end=on_step_end)
        except GenerationCancelled as exc:
            return Outcome(False, f"{exc}: no video written")
        except ConfigError as exc:
            return Outcome(False, f"error: {exc}")
        except Exception as exc:  # noqa: BLE001 - the page shows one line and keeps serving
            log.exception("generation failed")
            return Outcome(False, f"error: {first_line(exc, with_type=True)}")
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

    # ------------------------------------------------------------ files the page serves

    def serve(self, path: Path) -> str:
        """A link to a video or sidecar under the output folder, in the served folder (ValueError otherwise)."""
        return self.files.serve(path)

    def served_gallery(self) -> list[tuple[str, str]]:
        """gallery(), with every video linked into the served folder."""
        return self.files.served_gallery()

    def gallery(self, limit: int = GALLERY_LIMIT) -> list[tuple[str, str]]:
        """(video path, caption) of the newest videos under the output folder, newest first."""
        return self.files.gallery(limit)

    def queue_html(self) -> str:
        """The page's queue table: the newest jobs with their state, progress, prompt (as text) and video link."""
        rows = self.queue.rows()
        links = {}
        for row in rows:
            if row["status"] == "completed" and row["video"]:
                try:
                    links[row["id"]] = self.serve(self.output_dir / row["video"])
                except ValueError:  # removed since, or not a video under the output folder
                    pass
        return jobs_html(rows, links)

    def active(self) -> bool:
        """Jobs are waiting or running (the page refreshes its table meanwhile)."""
        return bool(self.queue.store.active())

    def close(self) -> None:
        """Start no more jobs, stop the runner, remove the served links (the videos and the queue stay)."""
        self._closed.set()
        self.queue.stop()
        self._runner.join(5)
        self.files.close()
        self._release_if_idle()

    def _release_if_idle(self) -> None:
        """After close(), once no job of this page runs (a running one is left to finish): let another page in."""
        if self._closed.is_set() and not self.queue.busy():
            self.lock.release()


def _invocation(job_id: str) -> dict:
    """A page job's invocation record (in its sidecar): the process's arguments and the job id."""
    return {"argv": list(sys.argv), "ui_job": job_id}


def _preset(option: str, name: Any, presets: dict[str, Any]) -> Any:
    """The preset of this name (only the ones composed at launch), else ConfigError listing them."""
    if not isinstance(name, str) or name not in presets:
        raise ConfigError(option, name, sorted(presets))
    return presets[name]


def _folder(path: str) -> str:
    """An allowed checkpoint folder as the page offers it: absolute, `~` expanded (no file system access)."""
    return str(Path(path.strip()).expanduser().absolute())
