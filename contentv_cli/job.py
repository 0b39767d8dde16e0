"""The job function Hydra runs for each job: take the resolved run the pre-flight check made (or resolve it here,
collectively, under torchrun), run it on the backend built once, print the summary, record sweep jobs."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import contentv
from contentv_cli.compose import load_presets

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from contentv.config import BackendConfig, RunConfig
    from contentv.runtime import RunResult, Runtime
    from contentv_cli.preflight import Prepared

log = logging.getLogger("demo")

# What the pre-flight check prepared in this process (None in a launcher's own worker process), and one runtime per
# backend config, kept across the jobs of a sweep so weights load once per (model, memory) key; replaced (and its
# memory freed) when the backend changes.
_STATE: dict = {"prepared": None, "key": None, "runtime": None, "typed": None}


def adopt(prepared: Prepared | None, typed: list[str] | None = None) -> None:
    """Hand the pre-flight check's work (resolved runs, the backend it built) and the command line as typed to the
    jobs of this process."""
    _STATE["prepared"], _STATE["typed"] = prepared, typed


def prepared() -> Prepared | None:
    """The pre-flight check's work in this process (None in a launcher's worker process)."""
    return _STATE["prepared"]


def searchpath_overrides() -> list[str]:
    """The running job's `hydra.searchpath=...` override, if any (extra config folders)."""
    from hydra.core.hydra_config import HydraConfig

    return [o for o in HydraConfig.get().overrides.hydra if o.startswith("hydra.searchpath=")]


def get_runtime(backend_cfg: BackendConfig, memory_name: str) -> Runtime:
    """The runtime for this backend config: its backend built once per process (the pre-flight check's, when it
    built this one), set up, and joined to the process group under torchrun."""
    import backends
    from backends import distributed
    from contentv.runtime import Runtime

    key = repr(backend_cfg)
    if _STATE["key"] != key:
        if _STATE["runtime"] is not None:
            _STATE["runtime"].release()
        prepared = _STATE["prepared"]
        if prepared is not None and prepared.backend is not None and prepared.backend_key == key:
            backend = prepared.backend
        else:
            distributed.configure(backend_cfg)  # under torchrun/SLURM: this rank's device (LOCAL_RANK)
            backend = backends.build_backend(backend_cfg)
        backend.setup()  # before joining the process group: NCCL/HCCL bind to the current device
        # Bars only on a terminal: in a log file their redraws pile up on one line (the summary has the times).
        runtime = Runtime(backend, world=distributed.init_world(backend), progress=sys.stderr.isatty())
        _STATE.update(key=key, runtime=runtime)
    runtime = _STATE["runtime"]
    if memory_name == "auto" and not runtime.presets:
        runtime.presets = load_presets(("memory",), searchpath_overrides()).memories
    return runtime


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def summary(result: RunResult) -> str:
    rec = result.record
    t = rec["timings_s"]
    stages = " | ".join(f"{k.replace('_', ' ')} {v:.2f} s" for k, v in t.items())
    peak, prepared = rec["peak_memory"], rec["prepared"]
    run = rec.get("run") or {}
    strategy = f"memory {prepared.get('memory_preset')} ({run.get('memory_choice', 'as configured')})"
    lines = [
        f"time:    {stages} ({rec['seconds_per_step']:.3f} s/step)",
        f"memory:  peak device {_gib(peak['device_bytes'])} | peak host RSS {_gib(peak['host_rss_bytes'])}"
        f" | placement {prepared.get('placement')} | attention {prepared.get('attention_kernel')} | {strategy}",
    ]
    changes = prepared.get("output_changes") or []
    if changes:  # quantization, VAE tiling, a step cache: every frame differs from everything resident
        lines.append("changes: " + "; ".join(changes))
    lines += [f"sidecar: {result.sidecar}" if result.sidecar else "sidecar: (off)", f"video:   {result.video}"]
    return "\n".join(lines)


def console_output(verbose: bool) -> None:
    """The console shows progress bars, the summary, and this runtime's warnings and errors (everything with
    verbose=true); Hydra's log file in the run folder keeps every INFO line and library notice either way."""
    logging.captureWarnings(True)  # library warnings go through logging: to the file, on the console if verbose
    if verbose:
        return
    import backends

    ours = (contentv.__name__, backends.__name__, "demo", "__main__")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
            handler.addFilter(lambda r: r.name.split(".")[0] in ours or r.levelno >= logging.ERROR)


def _serve_ui(cfg: RunConfig) -> None:
    """mode=ui: the web page (mode=serve: the video API), until Ctrl-C; a bad setting prints one line and exits
    with status 2."""
    import backends
    from contentv import serve, ui
    from contentv.errors import ConfigError

    launch = serve.main if cfg.mode == "serve" else ui.launch
    try:
        launch(cfg, load_presets(overrides=searchpath_overrides()), backends.build_backend)  # until Ctrl-C
    except ConfigError as exc:
        if cfg.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def run_single(prepared: Prepared) -> None:
    """A single run (not -m) with the config the pre-flight check composed, as Hydra's own run mode does it
    (its run folder, .hydra/ files, logging and callbacks), without composing it again."""
    from hydra._internal.callbacks import Callbacks
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import configure_log, run_job
    from hydra.types import HydraContext, RunMode
    from omegaconf import open_dict

    from contentv_cli.compose import hydra_context

    cfg = prepared.composed
    with hydra_context(), open_dict(cfg):
        if prepared.run_dir:
            cfg.hydra.run.dir = prepared.run_dir
        cfg.hydra.mode = RunMode.RUN
        configure_log(cfg.hydra.hydra_logging, cfg.hydra.verbose)
        callbacks = Callbacks(cfg)
        callbacks.on_run_start(config=cfg, config_name="config")
        context = HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=callbacks)
        ret = run_job(
            hydra_context=context,
            task_function=task,
            config=cfg,
            job_dir_key="hydra.run.dir",
            job_subdir_key=None,
            configure_logging=True,
        )
        callbacks.on_run_end(config=cfg, config_name="config", job_return=ret)
    _ = ret.return_value  # raises the job's exception, as Hydra does


def task(dcfg: DictConfig) -> None:
    """One Hydra job: the resolved run (the pre-flight check's, or resolved here), generated into the job folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from backends import distributed
    from contentv import sweep

    distributed.export_slurm_env()
    cfg = OmegaConf.to_object(dcfg)
    console_output(cfg.verbose)
    if cfg.mode in ("ui", "serve"):
        _serve_ui(cfg)
        return
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    job_dir = Path(hydra_cfg.runtime.output_dir)
    if cfg.output.dir is None:
        cfg.output.dir = str(job_dir)
    note, job, overrides = "", hydra_cfg.job.num if multirun else None, list(hydra_cfg.overrides.task)
    try:
        runtime = get_runtime(cfg.backend, cfg.memory.name)
        run = _resolved(runtime, cfg, job, overrides)
        if multirun:
            note = sweep.start_job(job_dir, cfg, job, runtime.world.rank, prompts=list(run.prompts))
            if note is None:  # done in an earlier run of this sweep
                return
        results = runtime.run_all(run)  # under torchrun: rank 0's folder (Hydra's ${now} dirs differ per rank)
    except KeyboardInterrupt:
        print("interrupted: no video written", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - one line unless debug; a sweep records it and goes on
        _failed(exc, cfg, multirun, job_dir, job, overrides, note)
        return
    for result in results:
        if result.record:  # ranks that don't write have no record
            print(summary(result))
    if multirun:
        try:
            sweep.finish_job(
                job_dir, job, overrides, cfg, results, note=note, rank=runtime.world.rank, prompts=list(run.prompts)
            )
        except OSError as exc:  # a full disk: one line; the job has no record, so it counts as failed and is redone
            log.error("job %s: %s", job, exc)
            print(f"error: job {job}: {exc}", file=sys.stderr)


def _resolved(runtime: Runtime, cfg: RunConfig, job: int | None, overrides: list[str]):
    """The pre-flight check's resolved run for this job, else resolved now (every rank together under torchrun);
    with how it was started, for its sidecar (and `contentv replay`)."""
    import dataclasses
    import os

    prepared = _STATE["prepared"]
    run = prepared.take(job, overrides) if prepared is not None and runtime.world.size == 1 else None
    run = runtime.resolve(cfg) if run is None else run.with_output_dir(cfg.output.dir)
    command = contentv.COMMAND if Path(sys.argv[0]).name == contentv.COMMAND else f"python {sys.argv[0]}"
    typed = _STATE["typed"] if _STATE["typed"] is not None else sys.argv[1:]
    invocation = {"command": command, "argv": list(typed), "overrides": list(overrides), "cwd": os.getcwd()}
    if job is not None:
        invocation["job"] = job
    return dataclasses.replace(run, invocation=invocation)


def _failed(
    exc: BaseException, cfg: RunConfig, multirun: bool, job_dir: Path, job: int | None, overrides: list, note: str
) -> None:
    """A job that failed: one line (exit 2 for a setting, 1 otherwise); a sweep records it and goes on."""
    from backends import distributed
    from contentv import sweep
    from contentv.errors import ConfigError, OutOfMemory, first_line

    if cfg.debug:
        raise exc
    message = str(exc) if isinstance(exc, (ConfigError, OutOfMemory)) else first_line(exc, with_type=True)
    if multirun:
        log.error("job %s failed: %s", job, message)
        try:
            sweep.finish_job(job_dir, job, overrides, cfg, [], error=message, note=note or "")
        except OSError as write_error:  # nothing recorded: the sweep counts the job as failed all the same
            print(f"error: job {job}: {write_error}", file=sys.stderr)
        return
    if _reports(exc, distributed.launch_env().rank):
        hint = "" if isinstance(exc, (ConfigError, OutOfMemory)) else " (debug=true for a traceback)"
        print(f"error: {message}{hint}", file=sys.stderr)
    sys.exit(2 if isinstance(exc, ConfigError) else 1)


# What a collective raises on the ranks left waiting when another rank failed (gloo, NCCL, HCCL).
PEER_FAILED = ("Connection closed by peer", "Connection reset by peer", "NCCL", "HCCL", "DistBackendError")


def _reports(exc: BaseException, rank: int) -> bool:
    """One line per launch: an out-of-memory error is its own rank's to report; a decision every rank received
    (ConfigError) and any other error, rank 0's; a collective that failed because another rank stopped, nobody's
    (that rank said why)."""
    from contentv.errors import ConfigError, OutOfMemory

    if isinstance(exc, OutOfMemory):
        return True
    if rank != 0:
        return False
    text = f"{type(exc).__name__}: {exc}"
    return isinstance(exc, ConfigError) or not any(marker in text for marker in PEER_FAILED)
