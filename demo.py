"""ContentV runtime: text to video from the command line (Hydra).

    python demo.py model=tiny_contentv backend=cpu        # tiny offline model on the CPU, seconds
    python demo.py                                        # ContentV-8B, reference defaults, backend=auto
    python demo.py backend=cuda sampling.prompt="a red fox in snow" sampling.num_frames=49
    python demo.py model.path=/ckpt/ContentV-8B memory=low_vram_24g
    python demo.py model=cogvideox_5b backend=cuda         # CogVideoX-5B (model=cogvideox_2b, tiny_cogvideox)
    USE_ASCEND_NPU=1 python demo.py                       # Ascend NPU (the reference's switch)
    python demo.py -m sampling.num_inference_steps=25,50 sampling.seed=1,2   # sweep; weights load once
    python demo.py mode=ui model=tiny_contentv backend=cpu   # web page on http://127.0.0.1:7860 ('.[ui]')
    python demo.py dry_run=true memory=auto memory.budget_gb=16   # the memory plan, no weights loaded
    torchrun --nproc_per_node=4 demo.py backend=cuda parallel=cfg parallel.ulysses_degree=2   # one video, 4 GPUs
    python demo.py --help                                 # groups, options and every field

Every setting is checked before anything is loaded or written: a bad one prints one line naming the
option, the value and what is allowed, and exits with status 2 (debug=true shows a traceback).
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent / "conf"
GROUPS = ("backend", "model", "memory", "sampling", "output", "parallel")
MODES = ("generate", "ui")
# Hydra's own flags that print something and exit; they skip our pre-flight checks.
PASSTHROUGH = ("help", "hydra_help", "cfg", "info", "shell_completion", "resolve")

log = logging.getLogger("demo")


class UsageError(Exception):
    """A bad command line; reported as one line, exit status 2."""


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    from contentv.config import RunConfig

    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _first_line(exc: BaseException) -> str:
    """The most specific message in an exception chain, on one line."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def compose_error(exc: BaseException, job: list[str]) -> str:
    """One line for a Hydra/OmegaConf composition error, naming the option and its value."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    key, e, inner = None, exc, exc
    while e is not None:
        key = getattr(e, "full_key", None) or key
        inner, e = e, e.__cause__
    message = _first_line(inner)
    if not key:
        return message
    values = {o.partition("=")[0].lstrip("+~"): o.partition("=")[2] for o in job}
    if isinstance(inner, (ConfigKeyError, ConfigAttributeError)):
        import dataclasses

        from contentv.config import RunConfig

        group, _, name = key.rpartition(".")
        node = {
            f.name: f.default_factory()
            for f in dataclasses.fields(RunConfig)
            if f.default_factory is not dataclasses.MISSING
        }.get(group)
        known = ", ".join(f.name for f in dataclasses.fields(node)) if node is not None else ""
        return f"{key}: no such option" + (f" (valid: {known})" if known else "")
    value = values.get(key)
    return f"{key}={value!r} is not valid: {message}" if value is not None else f"{key}: {message}"


def expand_jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override list of every job a (multi)run would launch; checks group option names."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:  # noqa: BLE001 - Hydra raises several types; all are usage errors here
        raise UsageError(_first_line(exc)) from exc
    choices: list[list[str]] = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            if not multirun:
                raise UsageError(f"{o.input_line}: a sweep needs -m (multirun)")
            values = list(o.sweep_string_iterator())
        else:
            values = [o.get_value_element_as_str()]
        if o.key_or_group in GROUPS and o.package is None and not o.is_delete():
            allowed = group_options(o.key_or_group)
            for v in values:
                if v not in allowed:
                    raise UsageError(f"{o.key_or_group}={v!r} is not valid: one of: {', '.join(allowed)}")
        choices.append([f"{key}={v}" for v in values])
    return [list(combo) for combo in itertools.product(*choices)] or [[]]


def preflight(argv: list[str]) -> bool:
    """Compose and validate every job before Hydra starts (so nothing is written for bad input).

    Returns True when the command is done (dry_run=true printed the plans).
    """
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from omegaconf import OmegaConf

    import backends
    from backends import distributed
    from backends import memory as mem
    from contentv import parallel
    from contentv.errors import ConfigError
    from contentv.runtime import validate_run
    from contentv.validation import check_writable_dir

    args = get_args_parser().parse_args(argv)
    if any(getattr(args, flag, None) for flag in PASSTHROUGH):
        return False
    jobs = expand_jobs(args.overrides, args.multirun)
    built = {}
    dry = False
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for job in jobs:
            try:
                dcfg = compose(config_name="config", overrides=job, return_hydra_config=True)
                hydra_cfg = dcfg.hydra
                del dcfg.hydra
                cfg = OmegaConf.to_object(dcfg)
            except Exception as exc:  # noqa: BLE001 - composition errors are usage errors
                raise UsageError(compose_error(exc, job)) from exc
            if cfg.debug:
                os.environ["HYDRA_FULL_ERROR"] = "1"
            if cfg.mode not in MODES:
                raise ConfigError("mode", cfg.mode, MODES)
            if cfg.mode == "ui":
                from contentv import ui

                if args.multirun:
                    raise UsageError("mode=ui serves one page: drop -m")
                ui.check_available()  # gradio installed? (one line: pip install '.[ui]')
                ui.check_ui(cfg)
            validate_run(cfg)
            world_size = distributed.launch_env().world_size
            launcher = hydra_cfg.get("launcher") or {}
            if args.multirun and "tasks_per_node" in launcher:  # submitit: a job is nodes x tasks_per_node ranks
                world_size = int(launcher.tasks_per_node) * int(launcher.get("nodes") or 1)
            parallel.layout(cfg.parallel, world_size)
            if world_size > 1 and cfg.mode != "generate":
                raise ConfigError("mode", cfg.mode, "generate under torchrun/SLURM (the web UI is one process)")
            check_writable_dir(
                "output.dir" if cfg.output.dir else "hydra.run.dir",
                cfg.output.dir or (hydra_cfg.sweep.dir if args.multirun else hydra_cfg.run.dir),
            )
            key = repr(cfg.backend)
            if key not in built:
                built[key] = backends.build_backend(cfg.backend)
            built[key].attention_kernel()  # an unknown or uninstalled kernel fails here
            if cfg.memory.name != "auto":
                mem.check(cfg.memory, built[key])
            if cfg.dry_run:
                from contentv.planner import format_plan
                from contentv.runtime import Runtime

                print(format_plan(Runtime(built[key]).plan(cfg)))
                dry = True
    return dry


# One runtime per backend config, kept across the jobs of a sweep so weights load once per
# (model, memory) key; replaced (and its memory freed) when the backend changes.
_STATE: dict = {"key": None, "runtime": None}


def get_runtime(backend_cfg):
    import backends
    from backends import distributed
    from contentv.runtime import Runtime

    distributed.configure(backend_cfg)  # under torchrun/SLURM: this rank's device (LOCAL_RANK)
    key = repr(backend_cfg)
    if _STATE["key"] != key:
        if _STATE["runtime"] is not None:
            _STATE["runtime"].release()
        backend = backends.build_backend(backend_cfg)
        backend.setup()
        _STATE.update(key=key, runtime=Runtime(backend, world=distributed.init_world(backend)))
    return _STATE["runtime"]


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def summary(result) -> str:
    rec = result.record
    t = rec["timings_s"]
    stages = " | ".join(f"{k.replace('_', ' ')} {v:.2f} s" for k, v in t.items())
    peak = rec["peak_memory"]
    return "\n".join(
        [
            f"time:    {stages} ({rec['seconds_per_step']:.3f} s/step)",
            f"memory:  peak device {_gib(peak['device_bytes'])} | peak host RSS {_gib(peak['host_rss_bytes'])}"
            f" | {rec['prepared'].get('placement')} | attention {rec['prepared'].get('attention_kernel')}",
            f"sidecar: {result.sidecar}" if result.sidecar else "sidecar: (off)",
            f"video:   {result.video}",
        ]
    )


def task(dcfg) -> None:
    """One Hydra job: build (or reuse) the runtime and generate the video(s)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from backends import distributed
    from contentv import parallel, sweep
    from contentv.errors import ConfigError

    distributed.export_slurm_env()
    cfg = OmegaConf.to_object(dcfg)
    if cfg.mode == "ui":
        import backends
        from contentv import ui

        ui.launch(cfg, backends.build_backend, CONF_DIR)  # blocks until Ctrl-C
        return
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    job_dir = Path(hydra_cfg.runtime.output_dir)
    if cfg.output.dir is None:
        cfg.output.dir = str(job_dir)
    try:
        runtime = get_runtime(cfg.backend)
        world = runtime.world
        if world.size > 1 or cfg.parallel.seeds:
            cfg.output.dir = world.broadcast(cfg.output.dir)  # rank 0's folder: Hydra's ${now} dirs differ per rank
            results = parallel.run_all(runtime, cfg, cfg.parallel, world)
        else:
            results = runtime.run_all(cfg)
    except KeyboardInterrupt:
        print("interrupted: no video written", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - one line unless debug; a sweep records it and goes on
        if cfg.debug:
            raise
        text = str(exc).strip().splitlines()
        message = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {text[0] if text else ''}"
        if multirun:
            log.error("job %s failed: %s", hydra_cfg.job.num, message)
            rows = sweep.job_rows(hydra_cfg.job.num, " ".join(hydra_cfg.overrides.task), [], error=message)
            sweep.write_job_rows(job_dir, rows)
            return
        print(
            f"error: {message}" + ("" if isinstance(exc, ConfigError) else " (debug=true for a traceback)"),
            file=sys.stderr,
        )
        sys.exit(2 if isinstance(exc, ConfigError) else 1)
    for result in results:
        if result.record:  # ranks that don't write have no record
            print(summary(result))
    if multirun and runtime.world.rank == 0:
        sweep.write_job_rows(job_dir, sweep.job_rows(hydra_cfg.job.num, " ".join(hydra_cfg.overrides.task), results))


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency
    Callback = object


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, collect every job's row into summary.csv/.md/.png."""

    def on_multirun_end(self, config, **kwargs) -> None:
        from contentv import sweep

        paths = sweep.write_summary(Path(config.hydra.sweep.dir))
        print("sweep summary: " + ", ".join(str(p) for p in paths.values()))


def main(argv: list[str] | None = None) -> int:
    import hydra

    from backends import distributed
    from contentv.errors import ConfigError

    argv = sys.argv[1:] if argv is None else argv
    # transformers' import-time notices (e.g. optional torchvision) aren't the user's concern; overridable.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    distributed.export_slurm_env()
    register_configs()
    try:
        if preflight(argv):
            return 0
    except (UsageError, ConfigError) as exc:
        if "debug=true" in argv:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.argv = [sys.argv[0], *argv]
    try:
        hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(task)()
    finally:
        distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
