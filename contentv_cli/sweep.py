"""Sweeps (-m) under Hydra: the sweeper that expands jobs with the command line's one expansion, and the callback that
reports how many jobs are done at the start and writes the summary at the end (exit status 1 if a job failed)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback

from contentv_cli.compose import expand_jobs, expand_parsed

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override
    from omegaconf import DictConfig

# Hydra instantiates sweepers only from its plugin namespace: this name is registered by `install_sweeper`, and
# conf/hydra/sweeper/contentv.yaml (the default) names it.
SWEEPER = "hydra_plugins.contentv_sweeper.ContentVSweeper"


def split_jobs(overrides: list[Override], max_batch_size: int | None) -> list[list[list[str]]]:
    """The sweeper's batches of jobs: the command line's one expansion (`contentv_cli.compose.expand_jobs`), so the
    jobs the pre-flight check resolved are the jobs that run, in the same order, and prompt values (choice() items
    included) reach each job exactly as typed."""
    jobs = expand_parsed(overrides, multirun=True)
    size = len(jobs) if max_batch_size in (None, -1) else max_batch_size
    return [jobs[i : i + size] for i in range(0, len(jobs), size)]


def install_sweeper() -> None:
    """Register Hydra's basic sweeper with `split_jobs` under its plugin name (Hydra looks plugins up by class name in
    a private table, hydra < 1.4). Made after Hydra's plugin scan, which re-imports its core plugins."""
    from hydra.core.plugins import Plugins

    plugins = Plugins.instance()
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    members = {"split_arguments": staticmethod(split_jobs), "__module__": __name__}
    members["validate_batch_is_legal"] = _validate_batch
    sweeper = type("ContentVSweeper", (BasicSweeper,), members)
    globals()["ContentVSweeper"] = sweeper  # Hydra instantiates a class by its dotted name
    plugins.class_name_to_class[SWEEPER] = sweeper


def _validate_batch(self: Any, batch: Any) -> None:
    """Hydra's sweeper composes every job once more to check it; the pre-flight check composed and resolved each
    job already (in this process), so that is skipped. Without one (a caller of Hydra's API), Hydra's check runs."""
    from contentv_cli import job

    if job.prepared() is None:
        type(self).__mro__[1].validate_batch_is_legal(self, batch)


def sweep_jobs(config: DictConfig) -> list[tuple[Path, Any]]:
    """(folder, RunConfig) of each job of the multirun: the jobs the sweeper runs (the same expansion): those the
    pre-flight check composed in this process, else each composed as Hydra's config loader composes it."""
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    from contentv_cli import job as jobs_module

    prepared = jobs_module.prepared()
    subdir = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir")
    if prepared is not None and prepared.multirun and subdir == "${hydra.job.num}":
        return [(Path(str(config.hydra.sweep.dir)) / str(n), j.cfg) for n, j in enumerate(prepared.jobs)]
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    jobs = []
    for num, overrides in enumerate(expand_jobs(list(config.hydra.overrides.task), True, params)):
        job = GlobalHydra.instance().config_loader().load_sweep_config(config, list(overrides))
        with open_dict(job):
            job.hydra.job.num = job.hydra.job.id = num
            folder = Path(str(job.hydra.sweep.dir)) / str(job.hydra.sweep.subdir)
            del job.hydra
        jobs.append((folder, OmegaConf.to_object(job)))
    return jobs


class SweepSummary(Callback):
    """Hydra callback. At the start of a multirun: the sweep folder is locked (a second copy of the same sweep stops
    with one line, exit 2) and it says how many jobs are done already (a resumed sweep skips them). At the end:
    every job's rows into summary.csv/.md/.png, and exit status 1 if a job failed or the summary could not be
    written. Hydra turns an exception in a callback into a warning, so every failure here leaves as SystemExit (one
    line on stderr), never as an exception."""

    jobs: int | None = None
    done: tuple[int, ...] = ()
    lock: Any = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from backends import distributed
        from contentv import sweep
        from contentv.errors import SweepError

        if distributed.launch_env().rank == 0:  # under torchrun the ranks share the sweep: rank 0 holds it
            try:
                self.lock = sweep.lock_sweep(Path(config.hydra.sweep.dir))
            except SweepError as exc:
                _exit(f"error: {exc}", exc.status)
        try:
            states = [
                sweep.job_state(folder, cfg, _prompts(num)) for num, (folder, cfg) in enumerate(sweep_jobs(config))
            ]
        except Exception as exc:  # noqa: BLE001 - see the class docstring
            _exit(f"error: the sweep's jobs could not be checked: {_line(exc)}", 2)
        self.jobs = len(states)
        self.done = tuple(num for num, state in enumerate(states) if state.done)
        print(sweep.count_line(states), file=sys.stderr)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from contentv import sweep

        sweep_dir, baseline = Path(config.hydra.sweep.dir), config.sweep.baseline
        end = sweep.end_sweep(sweep_dir, baseline=baseline, reused=self.done, jobs=self.jobs)  # never raises
        for line in end.out:
            print(line)
        for line in end.err:
            print(line, file=sys.stderr)
        if self.lock is not None:
            self.lock.release()
        if end.status:
            raise SystemExit(end.status)  # not an Exception: Hydra would only warn


def _prompts(num: int) -> list[str] | None:
    """Job `num`'s prompts as the pre-flight check read them (None: read them again)."""
    from contentv_cli import job

    prepared = job.prepared()
    if prepared is None or not prepared.multirun or num >= len(prepared.jobs) or prepared.jobs[num].run is None:
        return None
    return list(prepared.jobs[num].run.prompts)


def _line(exc: BaseException) -> str:
    from contentv.errors import first_line

    return first_line(exc, with_type=not isinstance(exc, OSError))


def _exit(line: str, status: int) -> None:
    print(line, file=sys.stderr)
    raise SystemExit(status)  # not an Exception: Hydra would only warn
