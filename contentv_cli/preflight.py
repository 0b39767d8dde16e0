"""The pre-flight check: every job of the command line composed, checked and resolved before Hydra writes anything.

Each job is resolved once (`contentv.resolve.resolve_run`: settings, files, kernel, memory decisions) on one
backend built once for the process, and handed to the job function (`contentv_cli.job`), which trusts it. Under
torchrun the memory decisions need every rank (rank 0 decides from the smallest free memory), so there the check
covers settings and files and the job function resolves the run collectively.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contentv_cli.compose import UsageError, _compose, compose_error, expand_jobs, hydra_context, load_presets

if TYPE_CHECKING:
    from contentv.config import RunConfig
    from contentv.resolve import ResolvedRun

# Hydra's flags that choose other configs than ours: a run with them is composed by Hydra itself.
HYDRA_SOURCES = ("config_path", "config_name", "config_dir", "experimental_rerun")
# Hydra's own flags that print something and exit; they skip our pre-flight checks.
PASSTHROUGH = ("help", "hydra_help", "cfg", "info", "shell_completion", "resolve")
# Hydra's mode flags: it takes at most one of them per command line (and raises a bare ValueError otherwise).
HYDRA_MODES = {"-m": "-m", "--multirun": "-m", "-r": "--run", "--run": "--run", "-c": "--cfg", "--cfg": "--cfg"}
HYDRA_MODES |= {
    "-i": "--info",
    "--info": "--info",
    "-sc": "--shell-completion",
    "--shell-completion": "--shell-completion",
}


@dataclass
class PreparedJob:
    """One job as the pre-flight check left it: its overrides, its config as composed, and its resolved run (None
    where the job function must resolve it: under torchrun, or for a dry run)."""

    overrides: list[str]
    cfg: RunConfig
    run: ResolvedRun | None = None


@dataclass
class Prepared:
    """Everything the pre-flight check composed, built and decided, for the job function to reuse."""

    argv: list[str]
    multirun: bool
    jobs: list[PreparedJob] = field(default_factory=list)
    backend: Any = None  # the backend, built once (None: none was needed, or several backend configs)
    backend_key: str | None = None
    dry: bool = False  # dry_run=true: the plans were printed, nothing runs
    run_dir: str | None = None  # the single run's own folder, reserved here
    composed: Any = None  # a single run's composed config (with Hydra's node), run as it is by job.run_single

    def take(self, num: int | None, overrides: Sequence[str]) -> ResolvedRun | None:
        """The resolved run of job `num` (None for a single run), if its overrides are the ones checked here."""
        index = 0 if num is None else num
        if index >= len(self.jobs):
            return None
        job = self.jobs[index]
        mine = sorted(o for o in job.overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/")))
        return job.run if mine == sorted(overrides) or num is None else None


def check_hydra_modes(argv: Sequence[str]) -> None:
    """UsageError (one line) when the command line asks Hydra for two modes at once, e.g. `-m ... --cfg job`."""
    modes = sorted({HYDRA_MODES[a] for a in argv if a in HYDRA_MODES})
    if len(modes) > 1:
        raise UsageError(
            f"{' and '.join(modes)} can't be combined: Hydra runs one of -m, --run, --cfg, --info at a time"
        )


def _compose_job(job: list[str]) -> tuple[Any, Any, Any]:
    """(RunConfig, Hydra's config node, the whole composed config) for one job's overrides; UsageError naming the
    option otherwise."""
    from omegaconf import OmegaConf

    try:
        full = _compose(job, hydra=True)
        dcfg = full.copy()
        hydra_cfg = full.hydra
        del dcfg.hydra
        return OmegaConf.to_object(dcfg), hydra_cfg, full
    except Exception as exc:  # noqa: BLE001 - composition errors are usage errors
        raise UsageError(compose_error(exc, job)) from exc


def _sweeper_params(hydra_cfg: Any) -> list[str]:
    """`hydra.sweeper.params` as KEY=VALUE overrides (the sweeper adds them before the command line's)."""
    params = hydra_cfg.get("sweeper", {}).get("params") or {}
    return [f"{k}={v}" for k, v in params.items()]


def _world_size(cfg: RunConfig, hydra_cfg: Any, multirun: bool) -> int:
    from backends import distributed

    world_size = distributed.check_launch().world_size
    launcher = hydra_cfg.get("launcher") or {}
    if multirun and "tasks_per_node" in launcher:  # submitit: a job is nodes x tasks_per_node ranks
        world_size = int(launcher.tasks_per_node) * int(launcher.get("nodes") or 1)
    return world_size


def _check_launcher(hydra_cfg: Any) -> None:
    """A sweep's launcher plugin is installed (Hydra's own message names only its config: 'Could not load ...')."""
    import importlib.util

    target = str((hydra_cfg.get("launcher") or {}).get("_target_") or "")
    if not target.startswith("hydra_plugins."):
        return
    module = ".".join(target.split(".")[:2])
    if importlib.util.find_spec(module) is None:
        from contentv.extras import install_hint

        package = module.split(".")[1].replace("_", "-")
        choice = hydra_cfg.runtime.choices.get("hydra/launcher")
        raise UsageError(f"hydra/launcher={choice} is not valid: it needs {package}: {install_hint('sweep')}")


def _mode_checks(cfg: RunConfig, multirun: bool) -> None:
    if cfg.debug:
        os.environ["HYDRA_FULL_ERROR"] = "1"
    if cfg.mode == "ui":
        from contentv import ui

        if multirun:
            raise UsageError("mode=ui serves one page: drop -m")
        ui.check_available()  # gradio installed? (one line: pip install '.[ui]')
    if cfg.mode == "serve" and multirun:
        raise UsageError("mode=serve runs one server: drop -m")


def preflight(argv: list[str]) -> Prepared | None:
    """Compose, check and resolve every job before Hydra starts (so nothing is written for bad input).

    Returns None for Hydra's own flags (--cfg, --info, ...), which it answers itself; `Prepared.dry` when
    dry_run=true printed the plans.
    """
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(argv)
    if any(getattr(args, flag, None) for flag in PASSTHROUGH):
        return None
    prepared = Prepared(argv=list(argv), multirun=bool(args.multirun))
    jobs = expand_jobs(args.overrides, args.multirun)
    with hydra_context():
        composed = [(job, *_compose_job(job)) for job in jobs]
        params = _sweeper_params(composed[0][2]) if args.multirun else []
        if params:  # sweeps set in a config file: expand again with them, as the sweeper will
            jobs = expand_jobs(args.overrides, True, params)
            composed = [(job, *_compose_job(job)) for job in jobs]
        if not args.multirun and not any(getattr(args, a, None) for a in HYDRA_SOURCES):
            prepared.composed = composed[0][3]  # a single run is composed once: run_single runs this config
        first = composed[0][1]
        if args.multirun:
            _check_launcher(composed[0][2])
        if args.multirun and first.sweep.baseline >= len(jobs):
            from contentv.errors import ConfigError

            raise ConfigError("sweep.baseline", first.sweep.baseline, f"a job number of this sweep: 0..{len(jobs) - 1}")
        if not args.multirun and not any(o.startswith("hydra.run.dir=") for o in args.overrides):
            prepared.run_dir = str(composed[0][2].run.dir)  # ${now:...} read once: checked, then reserved
        presets = None
        for job, cfg, hydra_cfg, _ in composed:
            _mode_checks(cfg, args.multirun)
            if cfg.memory.name == "auto" or cfg.dry_run:
                presets = presets or load_presets(("memory",), args.overrides)
            run = _check_job(prepared, cfg, hydra_cfg, presets, args.multirun)
            prepared.jobs.append(PreparedJob(job, cfg, run))
    return prepared


def _check_job(prepared: Prepared, cfg: RunConfig, hydra_cfg: Any, presets: Any, multirun: bool) -> Any:
    """Resolve one job (or check a dry run's settings and print its plan). Returns its ResolvedRun or None."""
    import backends
    from contentv.resolve import resolve_run
    from contentv.validation import check_settings

    world_size = _world_size(cfg, hydra_cfg, multirun)
    if cfg.dry_run:
        # Plans for the named backend's device on any machine: its capabilities, no device needed.
        from contentv.planner import format_plan, plan

        cls = backends.backend_class(cfg.backend.name)
        cls.check_options(cfg.backend.options)
        caps = cls.capabilities()
        check_settings(cfg, caps, world_size=world_size)
        print(format_plan(plan(cfg, presets.memories, caps)))
        prepared.dry = True
        return None
    option = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    out_dir = hydra_cfg.sweep.dir if multirun else (prepared.run_dir or hydra_cfg.run.dir)
    if world_size > 1 or cfg.mode != "generate":  # the ranks decide together in the job (or nothing to decide)
        backends.backend_class(cfg.backend.name).check_options(cfg.backend.options)
        resolve_run(cfg, None, world_size=world_size, output_dir=out_dir, output_option=option)
        return None
    backend = _backend(prepared, cfg)
    return resolve_run(
        cfg,
        backend,
        presets=presets.memories if presets else None,
        budget_bytes=backend.free_memory(),
        output_dir=out_dir,
        output_option=option,
    )


def _backend(prepared: Prepared, cfg: RunConfig) -> Any:
    """The backend for this job's config: built once (the job function reuses it); a sweep over backend settings
    builds each one as its jobs come."""
    import backends
    from backends import distributed

    key = repr(cfg.backend)
    if prepared.backend is not None and prepared.backend_key == key:
        return prepared.backend
    distributed.configure(cfg.backend)  # under SLURM: the variables a launch needs
    backend = backends.build_backend(cfg.backend)
    if prepared.backend is None:
        prepared.backend, prepared.backend_key = backend, key
    return backend


def reserve_run_dir(folder: str) -> str:
    """A run folder of its own: `folder`, or `folder-N` when another run (started the same second) has it. Made
    here, so the next run sees it taken."""
    base = Path(folder)
    for n in range(1000):
        candidate = base if n == 0 else base.with_name(f"{base.name}-{n}")
        try:
            candidate.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            continue
        return str(candidate)
    raise UsageError(f"hydra.run.dir={folder!r} is not valid: a free folder name (1000 runs already use it)")
