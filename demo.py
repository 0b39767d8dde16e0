"""ContentV runtime: text to video from the command line (Hydra). Installed as the `contentv` command too.

    python demo.py model=tiny_contentv backend=cpu        # tiny offline model on the CPU, seconds
    python demo.py                                        # ContentV-8B, reference defaults, backend=auto
    python demo.py backend=cuda sampling.prompt="a red fox, walking in snow" sampling.num_frames=49
    python demo.py model.path=/ckpt/ContentV-8B memory=low_vram_24g
    python demo.py model=cogvideox_5b backend=cuda         # CogVideoX-5B (model=cogvideox_2b, tiny_cogvideox)
    USE_ASCEND_NPU=1 python demo.py                       # Ascend NPU (the reference's switch)
    python demo.py -m sampling.num_inference_steps=25,50 sampling.seed=1,2   # sweep; weights load once
    python demo.py -m 'sampling.prompt=choice("a cat","a dog")'              # sweep over prompts
    python demo.py compare multirun/before multirun/after                    # two sweeps' time, memory, PSNR
    python demo.py mode=ui model=tiny_contentv backend=cpu   # web page on http://127.0.0.1:7860 ('.[ui]')
    python demo.py dry_run=true backend=cuda memory.budget_gb=16   # the memory plan for a 16 GB GPU, no weights
    torchrun --nproc_per_node=4 demo.py backend=cuda parallel=cfg parallel.ulysses_degree=2   # one video, 4 GPUs
    python demo.py --help                                 # groups, options and every field

Every setting is checked before anything is loaded or written: a bad one prints one line naming the
option, the value and what is allowed, and exits with status 2 (debug=true shows a traceback).

From Python, the same presets without the command line: `load_config([...])` and `load_presets()`.

Longer than 500 lines because everything that touches Hydra lives here: the library (contentv/) and the backends
never import it, so composing configs and presets, parsing overrides, --help, the pre-flight check's Hydra half,
the job function and the sweep callback share this one entry module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import contentv  # first, and light (no torch): a run's start-up is measured from here (contentv.IMPORTED_AT)

if TYPE_CHECKING:  # Hydra, OmegaConf and the runtime (torch) load lazily: `--help` and pre-flight errors don't
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import DictConfig

    from contentv.config import BackendConfig, Presets, RunConfig
    from contentv.runtime import RunResult, Runtime

GROUPS = ("backend", "model", "memory", "sampling", "output", "parallel")
PRESET_GROUPS = ("model", "memory", "backend")
# Free text: taken as typed (commas, quotes, brackets, '=', '${', unicode ...), one job even under -m.
PROMPT_KEYS = ("sampling.prompt", "sampling.negative_prompt")
# Hydra's own flags that print something and exit; they skip our pre-flight checks.
PASSTHROUGH = ("help", "hydra_help", "cfg", "info", "shell_completion", "resolve")

log = logging.getLogger("demo")


class UsageError(Exception):
    """A bad command line; reported as one line, exit status 2."""


# ------------------------------------------------------------------------------------------ configs


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    from contentv.config import RunConfig

    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def group_options(group: str, overrides: Sequence[str] = ()) -> list[str]:
    """The options of a config group: conf/<group>/*.yaml (shipped as package data of `conf`), plus any folder
    added with `hydra.searchpath=[file://...]` in `overrides`."""
    from hydra.core.global_hydra import GlobalHydra

    searchpath = [o for o in overrides if o.startswith("hydra.searchpath=")]
    with hydra_context():
        loader = GlobalHydra.instance().config_loader()
        return sorted(loader.get_group_options(group, config_name="config", overrides=searchpath))


def quote_text(text: str) -> str:
    """`text` as a quoted Hydra override value that composes back to exactly `text`.

    Two layers: OmegaConf reads "${" as an interpolation (k backslashes before it become 2k+1, the last one
    escaping it); Hydra's quoted strings treat backslashes as escapes only before a quote or at the end.
    """
    s = re.sub(r"(\\*)\$\{", lambda m: "\\" * (2 * len(m.group(1)) + 1) + "${", text)
    s = re.sub(r"(\\*)('|$)", lambda m: "\\" * (2 * len(m.group(1))) + ("\\'" if m.group(2) else ""), s)
    return "'" + s + "'"


def literal_prompts(overrides: Sequence[str], multirun: bool) -> list[str]:
    """Rewrite `sampling.prompt=<any text>` (and the negative prompt) into a quoted override, so Hydra's grammar
    never parses prompt text. Under -m, an explicit `choice(...)` sweep is left to Hydra."""
    out = []
    for item in overrides:
        key, eq, value = item.partition("=")
        if eq and key in PROMPT_KEYS and not (multirun and re.fullmatch(r"\s*choice\(.*\)\s*", value, re.S)):
            item = f"{key}={quote_text(value)}"
        out.append(item)
    return out


def compose_error(exc: BaseException, job: list[str]) -> str:
    """One line for a Hydra/OmegaConf composition error, naming the option and its value."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    from contentv.errors import first_line

    key, e, inner = None, exc, exc
    while e is not None:
        key = getattr(e, "full_key", None) or key
        inner, e = e, e.__cause__
    message = first_line(inner)
    if not key:
        return message
    values = {o.partition("=")[0].lstrip("+~"): o.partition("=")[2] for o in job}
    if isinstance(inner, (ConfigKeyError, ConfigAttributeError)):
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


def _field_types() -> dict[str, type]:
    """Dotted option -> annotated type, for every field of RunConfig and its groups."""
    import typing

    from contentv.config import RunConfig

    out: dict[str, type] = {}

    def walk(cls: type, prefix: str) -> None:
        for name, hint in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{name}.")
            else:
                out[f"{prefix}{name}"] = hint

    walk(RunConfig, "")
    return out


def expand_jobs(overrides: list[str], multirun: bool) -> list[list[str]]:
    """The override list of every job a (multi)run would launch; checks group option names and switches."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from contentv.errors import first_line

    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
    except Exception as exc:  # noqa: BLE001 - Hydra raises several types; all are usage errors here
        raise UsageError(_unparsable(parser, overrides) or first_line(exc, innermost=True)) from exc
    types = _field_types()
    choices: list[list[str]] = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            if not multirun:
                raise UsageError(f"{o.input_line}: a sweep needs -m (multirun)")
            if key in PROMPT_KEYS:  # choice("a cat", "a dog"): each item as typed
                values = [quote_text(str(v)) for v in o.sweep_iterator()]
            else:
                values = list(o.sweep_string_iterator())
        else:
            values = [o.get_value_element_as_str()]
        if o.key_or_group in GROUPS and o.package is None and not o.is_delete():
            allowed = group_options(o.key_or_group, overrides)
            for v in values:
                if v not in allowed:
                    raise UsageError(f"{o.key_or_group}={v!r} is not valid: one of: {', '.join(allowed)}")
        elif types.get(o.key_or_group) in (bool, bool | None) and not o.is_sweep_override():
            # OmegaConf would turn 2 or "yes" into True: a switch takes exactly true or false (or null if optional).
            optional = types[o.key_or_group] is not bool
            if not isinstance(o.value(), bool) and not (optional and o.value() is None):
                allowed = "true, false or null" if optional else "true or false"
                raise UsageError(f"{o.key_or_group}={o.get_value_element_as_str()!r} is not valid: {allowed}")
        choices.append([f"{key}={v}" for v in values])
    return [list(combo) for combo in itertools.product(*choices)] or [[]]


@contextlib.contextmanager
def hydra_context() -> Iterator[None]:
    """Hydra initialized on the packaged configs (reused if the caller already initialized it)."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_module(config_module="conf", version_base="1.3"):
        yield


def _unparsable(parser: OverridesParser, overrides: Sequence[str]) -> str | None:
    """The first override Hydra's grammar rejects, as one line naming it and how to quote it."""
    for item in overrides:
        try:
            parser.parse_overrides([item])
        except Exception:  # noqa: BLE001 - the grammar's errors
            key, eq, value = item.partition("=")
            if not eq:
                return f"{item!r} is not valid: an override KEY=VALUE (or GROUP=OPTION)"
            return (
                f"{key}={value!r} is not valid: a value Hydra can parse; quote text with spaces or characters such as "
                f":!,[]{{}}()=' in single quotes: {key}='...'"
            )
    return None


def _compose(overrides: Sequence[str], hydra: bool = False):
    from hydra import compose

    return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


def load_config(overrides: Sequence[str] = ()) -> RunConfig:
    """The RunConfig the command line would build from `overrides` (same presets, same checks of the syntax):

    >>> cfg = load_config(["model=tiny_contentv", "backend=cpu", "sampling.prompt=a red fox, walking in snow"])

    Prompt overrides take any text as typed. Raises UsageError for a bad override or option name.
    """
    from omegaconf import OmegaConf

    (job,) = expand_jobs(literal_prompts(overrides, multirun=False), multirun=False)
    with hydra_context():
        try:
            return OmegaConf.to_object(_compose(job))
        except Exception as exc:  # noqa: BLE001 - composition errors are usage errors
            raise UsageError(compose_error(exc, job)) from exc


def load_presets(groups: Sequence[str] = PRESET_GROUPS, overrides: Sequence[str] = ()) -> Presets:
    """Every option of the preset groups (model, memory, backend), composed by Hydra in one pass and typed:
    what the web page offers and what memory=auto chooses from (`contentv.config.Presets`). `overrides` may add
    config folders (hydra.searchpath=[...])."""
    from hydra import compose
    from omegaconf import OmegaConf

    from contentv.config import BackendConfig, MemoryConfig, ModelConfig, Presets

    schemas = {"model": ModelConfig, "memory": MemoryConfig, "backend": BackendConfig}
    # One composition places each option under its own package (+memory@_memory.int8=int8 ...).
    searchpath = [o for o in overrides if o.startswith("hydra.searchpath=")]
    placed = [f"+{g}@_{g}.{name}={name}" for g in groups for name in group_options(g, searchpath)]
    with hydra_context():
        tree = compose(config_name=None, overrides=[*searchpath, *placed])
    found = {
        g: {
            n: OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schemas[g]), v))
            for n, v in tree[f"_{g}"].items()
        }
        for g in groups
    }
    return Presets(models=found.get("model", {}), memories=found.get("memory", {}), backends=found.get("backend", {}))


# ------------------------------------------------------------------------------------------ help


def help_text(overrides: Sequence[str]) -> str:
    """--help: usage and examples (conf/config.yaml's hydra.help), the config groups and their options, and every
    field with the value this command line composes to and its one-line description (contentv.config)."""
    import textwrap

    from omegaconf import OmegaConf

    from contentv.config import field_docs

    (job,) = expand_jobs(literal_prompts([o for o in overrides if o != "-m"], False), False)
    with hydra_context():
        try:
            composed = _compose(job, hydra=True)
        except Exception as exc:  # noqa: BLE001 - composition errors are usage errors
            raise UsageError(compose_error(exc, job)) from exc
        groups = {g: group_options(g, job) for g in (*GROUPS, "hydra/launcher")}
    help_cfg = composed.hydra.help
    del composed.hydra
    values = OmegaConf.to_container(composed, resolve=True)
    chosen = {g: (values.get(g) or {}).get("name") for g in GROUPS}
    lines = [help_cfg.header.rstrip(), "", "Config groups (GROUP=OPTION; * = this command line's choice):"]
    for group, options in groups.items():
        marked = ", ".join(f"{o}*" if o == chosen.get(group) else o for o in options)
        lines.append(f"  {group:<16}{marked}")
    lines += ["", "Fields (KEY=VALUE as this command line composes them; null = the default described):"]
    docs = field_docs()
    for key, doc in docs.items():
        node = values
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        shown = f"{key}={_show(node)}"
        wrapped = textwrap.wrap(doc, 118 - 44) or [""]
        lines.append(f"  {shown:<42}{wrapped[0]}" if len(shown) < 42 else f"  {shown}\n{'':44}{wrapped[0]}")
        lines += [f"{'':44}{more}" for more in wrapped[1:]]
    lines += ["", help_cfg.footer.rstrip(), "Hydra's own flags: --hydra-help; the composed config: --cfg job."]
    return "\n".join(lines)


def _show(value: object) -> str:
    """A field's value as the command line writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value and re.fullmatch(r"[\w./:-]+", value) else repr(value)
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------------------------ pre-flight


def _compose_job(job: list[str]):
    """(RunConfig, Hydra's config) for one job's overrides; UsageError naming the option otherwise."""
    from omegaconf import OmegaConf

    try:
        dcfg = _compose(job, hydra=True)
        hydra_cfg = dcfg.hydra
        del dcfg.hydra
        return OmegaConf.to_object(dcfg), hydra_cfg
    except Exception as exc:  # noqa: BLE001 - composition errors are usage errors
        raise UsageError(compose_error(exc, job)) from exc


def preflight(argv: list[str]) -> bool:
    """Compose and validate every job before Hydra starts (so nothing is written for bad input).

    Returns True when the command is done (dry_run=true printed the plans).
    """
    from hydra._internal.utils import get_args_parser

    import backends
    from backends import distributed
    from contentv.validation import check_settings, validate_run

    args = get_args_parser().parse_args(argv)
    if any(getattr(args, flag, None) for flag in PASSTHROUGH):
        return False
    jobs = expand_jobs(args.overrides, args.multirun)
    configs = []
    with hydra_context():
        # First every job's settings alone (fast: no device, no weights), then what needs the device and the files.
        for job in jobs:
            cfg, hydra_cfg = _compose_job(job)
            if cfg.debug:
                os.environ["HYDRA_FULL_ERROR"] = "1"
            if cfg.mode == "ui":
                from contentv import ui

                if args.multirun:
                    raise UsageError("mode=ui serves one page: drop -m")
                ui.check_available()  # gradio installed? (one line: pip install '.[ui]')
            if cfg.mode == "serve" and args.multirun:
                raise UsageError("mode=serve runs one server: drop -m")
            world_size = distributed.check_launch().world_size
            launcher = hydra_cfg.get("launcher") or {}
            if args.multirun and "tasks_per_node" in launcher:  # submitit: a job is nodes x tasks_per_node ranks
                world_size = int(launcher.tasks_per_node) * int(launcher.get("nodes") or 1)
            check_settings(cfg, world_size=world_size)
            configs.append((cfg, hydra_cfg, world_size))
        if args.multirun and configs[0][0].sweep.baseline >= len(jobs):
            from contentv.errors import ConfigError

            baseline = configs[0][0].sweep.baseline
            raise ConfigError("sweep.baseline", baseline, f"a job number of this sweep: 0..{len(jobs) - 1}")
        built: dict = {}
        presets = None
        dry = False
        for cfg, hydra_cfg, world_size in configs:
            if cfg.dry_run:
                # Plans for the named backend's device on any machine: its capabilities, no device needed.
                from contentv.planner import format_plan, plan

                presets = presets or load_presets(("memory",), args.overrides)
                caps = backends.backend_class(cfg.backend.name).capabilities()
                print(format_plan(plan(cfg, presets.memories, caps)))
                dry = True
                continue
            key = repr(cfg.backend)
            if key not in built:
                built[key] = backends.build_backend(cfg.backend)
            option = "hydra.sweep.dir" if args.multirun else "hydra.run.dir"
            out_dir = hydra_cfg.sweep.dir if args.multirun else hydra_cfg.run.dir
            validate_run(cfg, built[key], world_size=world_size, output_dir=out_dir, output_option=option)
    return dry


# ------------------------------------------------------------------------------------------ jobs

# One runtime per backend config, kept across the jobs of a sweep so weights load once per
# (model, memory) key; replaced (and its memory freed) when the backend changes.
_STATE: dict = {"key": None, "runtime": None}


def searchpath_overrides() -> list[str]:
    """The running job's `hydra.searchpath=...` override, if any (extra config folders)."""
    from hydra.core.hydra_config import HydraConfig

    return [o for o in HydraConfig.get().overrides.hydra if o.startswith("hydra.searchpath=")]


def get_runtime(backend_cfg: BackendConfig, memory_name: str) -> Runtime:
    import backends
    from backends import distributed
    from contentv.runtime import Runtime

    distributed.configure(backend_cfg)  # under torchrun/SLURM: this rank's device (LOCAL_RANK)
    key = repr(backend_cfg)
    if _STATE["key"] != key:
        if _STATE["runtime"] is not None:
            _STATE["runtime"].release()
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


def console_output(verbose: bool) -> None:
    """The console shows progress bars, the summary, and this runtime's warnings and errors (everything with
    verbose=true); Hydra's log file in the run folder keeps every INFO line and library notice either way."""
    logging.captureWarnings(True)  # library warnings go through logging: to the file, on the console if verbose
    if verbose:
        return
    import backends

    ours = (contentv.__name__, backends.__name__, __name__, "__main__")
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


def task(dcfg: DictConfig) -> None:
    """One Hydra job: build (or reuse) the runtime and generate the video(s)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from backends import distributed
    from contentv import sweep
    from contentv.errors import ConfigError, OutOfMemory, first_line

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
    if multirun:
        note = sweep.start_job(job_dir, cfg, job, distributed.launch_env().rank)
        if note is None:  # done in an earlier run of this sweep
            return
    try:
        runtime = get_runtime(cfg.backend, cfg.memory.name)
        results = runtime.run_all(cfg)  # under torchrun: rank 0's folder (Hydra's ${now} dirs differ per rank)
    except KeyboardInterrupt:
        print("interrupted: no video written", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - one line unless debug; a sweep records it and goes on
        if cfg.debug:
            raise
        message = str(exc) if isinstance(exc, (ConfigError, OutOfMemory)) else first_line(exc, with_type=True)
        if multirun:
            log.error("job %s failed: %s", job, message)
            sweep.finish_job(job_dir, job, overrides, cfg, [], error=message, note=note)
            return
        print(
            f"error: {message}"
            + ("" if isinstance(exc, (ConfigError, OutOfMemory)) else " (debug=true for a traceback)"),
            file=sys.stderr,
        )
        sys.exit(2 if isinstance(exc, ConfigError) else 1)
    for result in results:
        if result.record:  # ranks that don't write have no record
            print(summary(result))
    if multirun:
        sweep.finish_job(job_dir, job, overrides, cfg, results, note=note, rank=runtime.world.rank)


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency
    Callback = object


def sweep_jobs(config: DictConfig) -> list[tuple[Path, object]]:
    """(folder, RunConfig) of each job of the multirun, as Hydra's basic sweeper and config loader make them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf, open_dict

    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task])
    (batch,) = BasicSweeper.split_arguments(parsed, None)
    jobs = []
    for num, overrides in enumerate(batch):
        job = GlobalHydra.instance().config_loader().load_sweep_config(config, list(overrides))
        with open_dict(job):
            job.hydra.job.num = job.hydra.job.id = num
            folder = Path(str(job.hydra.sweep.dir)) / str(job.hydra.sweep.subdir)
            del job.hydra
        jobs.append((folder, OmegaConf.to_object(job)))
    return jobs


class SweepSummary(Callback):
    """Hydra callback. At the start of a multirun: how many jobs are done already (a resumed sweep skips them).
    At the end: every job's rows into summary.csv/.md/.png, and exit status 1 if a job failed."""

    jobs: int | None = None
    done: tuple[int, ...] = ()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from contentv import sweep

        states = [sweep.job_state(folder, cfg) for folder, cfg in sweep_jobs(config)]
        self.jobs = len(states)
        self.done = tuple(num for num, state in enumerate(states) if state.done)
        print(sweep.count_line(states), file=sys.stderr)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from contentv import sweep

        sweep_dir, baseline = Path(config.hydra.sweep.dir), config.sweep.baseline
        result = sweep.write_summary(sweep_dir, baseline=baseline, reused=self.done, jobs=self.jobs)
        print("sweep summary: " + ", ".join(str(p) for p in result.paths.values()))
        if result.failed:
            print(result.failure_line(), file=sys.stderr)
            raise SystemExit(1)  # not an Exception: Hydra would only warn; every launcher runs this in the main process


# Hydra's mode flags: it takes at most one of them per command line (and raises a bare ValueError otherwise).
HYDRA_MODES = {"-m": "-m", "--multirun": "-m", "-r": "--run", "--run": "--run", "-c": "--cfg", "--cfg": "--cfg"}
HYDRA_MODES |= {
    "-i": "--info",
    "--info": "--info",
    "-sc": "--shell-completion",
    "--shell-completion": "--shell-completion",
}


def check_hydra_modes(argv: Sequence[str]) -> None:
    """UsageError (one line) when the command line asks Hydra for two modes at once, e.g. `-m ... --cfg job`."""
    modes = sorted({HYDRA_MODES[a] for a in argv if a in HYDRA_MODES})
    if len(modes) > 1:
        raise UsageError(
            f"{' and '.join(modes)} can't be combined: Hydra runs one of -m, --run, --cfg, --info at a time"
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:  # two sweep folders side by side; before the imports below (no torch needed)
        from contentv.sweep import compare

        return compare.main(argv[1:], prog="python demo.py compare")
    import hydra

    from backends import distributed
    from contentv.errors import ConfigError

    # transformers' import-time notices (e.g. optional torchvision) aren't the user's concern; overridable. Set
    # before anything imports transformers.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from contentv import _diffusers

    _diffusers.defer_quantization_libraries()  # imported only when a quantization is selected
    multirun = any(a in ("-m", "--multirun") for a in argv)
    argv = literal_prompts(argv, multirun)
    distributed.export_slurm_env()
    register_configs()
    try:
        check_hydra_modes(argv)
        if any(a in ("--help", "-h") for a in argv):
            print(help_text([a for a in argv if a not in ("--help", "-h")]))
            return 0
        if preflight(argv):
            return 0
    except (UsageError, ConfigError) as exc:
        if "debug=true" in argv:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.argv = [sys.argv[0], *argv]
    try:
        hydra.main(config_path="pkg://conf", config_name="config", version_base="1.3")(task)()
    finally:
        distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
