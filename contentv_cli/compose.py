"""Composing configs with Hydra: overrides -> jobs -> typed `RunConfig`s, and the presets of each group.

The one place that knows Hydra's grammar. `expand_jobs` is the one job expansion: the pre-flight check and the
sweeper (`contentv_cli.sweep.Sweeper`, which Hydra's multirun uses) both call it, so they always agree on the jobs
of a sweep, `hydra.sweeper.params` included. Python users: `load_config([...])` and `load_presets()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import re
import typing
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # Hydra, OmegaConf and the runtime (torch) load lazily: `--help` and pre-flight errors don't
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Override

    from contentv.config import Presets, RunConfig

GROUPS = ("backend", "model", "memory", "sampling", "output", "parallel")
PRESET_GROUPS = ("model", "memory", "backend")
# Free text: taken as typed (commas, quotes, brackets, '=', '${', unicode ...), one job even under -m.
PROMPT_KEYS = ("sampling.prompt", "sampling.negative_prompt")
# The name Hydra gives the job (its log file is <run folder>/demo.log).
JOB_NAME = "demo"
# How many times configs were composed in this process (tests count them).
COUNTS = {"compose": 0}


class UsageError(Exception):
    """A bad command line; reported as one line, exit status 2."""


def config_dir() -> Path:
    """The folder of the Hydra configs: the repository's conf/ (a checkout or an editable install), else the copy
    installed inside the library (contentv/conf in a wheel). Addressed by path, never as a top-level `conf` module,
    so a user's own `conf` package can't shadow it."""
    import contentv

    here = Path(__file__).resolve().parents[1]  # the repository, or site-packages
    for folder in (here / "conf", Path(contentv.__file__).resolve().parent / "conf"):
        if (folder / "config.yaml").is_file():
            return folder
    raise UsageError(
        f"the runtime's configs are missing: no config.yaml in {here / 'conf'} or {here / 'contentv/conf'}"
    )


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
    never parses prompt text. A value that is one Hydra-quoted string ('...' or "...", as Hydra documents) means its
    content and is left to Hydra; anything else is taken as typed. Under -m, a `choice(...)` sweep is left to the
    sweeper, which quotes each item as typed."""
    out = []
    for item in overrides:
        key, eq, value = item.partition("=")
        if eq and key in PROMPT_KEYS and not _hydra_quoted(value):
            if not (multirun and re.fullmatch(r"\s*choice\(.*\)\s*", value, re.S)):
                item = f"{key}={quote_text(value)}"
        out.append(item)
    return out


_QUOTED = re.compile(r"""\s*(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")\s*""", re.S)


def _hydra_quoted(value: str) -> bool:
    """`value` is exactly one quoted string in Hydra's grammar ('a cat, sitting' or "it's")."""
    if not _QUOTED.fullmatch(value):
        return False
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_override(f"k={value}")
    except Exception:  # noqa: BLE001 - not Hydra's quoting after all: taken as typed
        return False
    return isinstance(parsed.value(), str) and not parsed.is_sweep_override()


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
        return f"{key}: no such option" + suggestion(key, values.get(key)) + (f" (valid: {known})" if known else "")
    value = values.get(key)
    return f"{key}={value!r} is not valid: {message}" if value is not None else f"{key}: {message}"


def suggestion(key: str, value: str | None = None) -> str:
    """'; did you mean X?' for an unknown option or group: the group that has `value` as an option (modle=tiny_contentv
    -> model), the field of that name in its group (prompt -> sampling.prompt), else the closest option or group
    name, else nothing."""
    import difflib

    key = key.lstrip("+~")
    if value:
        groups = [g for g in GROUPS if value in group_options(g)]
        groups.sort(key=lambda g: -difflib.SequenceMatcher(None, key, g).ratio())
        if groups:
            return f"; did you mean {groups[0]}={value}?"
    fields = list(_field_types())
    same_name = [f for f in fields if f.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1] and f != key]
    close = same_name or difflib.get_close_matches(key, [*GROUPS, *fields], n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""


def _check_addition(o: Override, types: dict[str, type]) -> None:
    """`+KEY=VALUE` adds a key: only where the schema takes free keys (a mapping field such as
    model.sampling_defaults) or Hydra's own settings; anything else would be dropped without a word."""
    key = o.key_or_group
    if not o.is_add() or o.package is not None or key.startswith(("hydra.", "hydra/")) or key in GROUPS:
        return
    parts = key.split(".")
    mappings = [k for k, t in types.items() if typing.get_origin(t) is dict or t is dict]
    if any(".".join(parts[:n]) in mappings for n in range(1, len(parts))):
        return
    known = "" if key not in types else f" ({key} exists: set it without +)"
    raise UsageError(f"+{key}: no such option to add{known or suggestion(key)}")


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


def expand_jobs(overrides: Sequence[str], multirun: bool, params: Sequence[str] = ()) -> list[list[str]]:
    """The override list of every job a (multi)run launches, in the order Hydra numbers them: `params` (the
    sweeper's `hydra.sweeper.params`, as KEY=VALUE) then the command line's, a later value of a key replacing an
    earlier one in its place, every sweep expanded (the product, last key fastest). Checks group option names and
    switches. Prompt values (and each `choice()` item of a prompt) are quoted so Hydra reads them as typed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from contentv.errors import first_line

    parser = OverridesParser.create()
    items = [*params, *overrides]
    try:
        parsed = parser.parse_overrides(list(items))
    except Exception as exc:  # noqa: BLE001 - Hydra raises several types; all are usage errors here
        raise UsageError(_unparsable(parser, items) or first_line(exc, innermost=True)) from exc
    return expand_parsed(parsed, multirun, [o for o in items if o.startswith("hydra.searchpath=")])


def expand_parsed(parsed: Sequence[Override], multirun: bool, searchpath: Sequence[str] = ()) -> list[list[str]]:
    """`expand_jobs` for overrides Hydra already parsed (the sweeper's entry)."""
    types = _field_types()
    choices: OrderedDict[str, list[str]] = OrderedDict()
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            if not multirun:
                raise UsageError(f"{o.input_line}: a sweep needs -m (multirun)")
            if not o.is_discrete_sweep():
                raise UsageError(f"{o.input_line}: only discrete sweeps (A,B or choice(...)) are supported")
            if key in PROMPT_KEYS:  # choice("a cat", "a dog"): each item as typed
                values = [quote_text(str(v)) for v in o.sweep_iterator()]
            else:
                values = list(o.sweep_string_iterator())
        else:
            values = [o.get_value_element_as_str()]
            if key in PROMPT_KEYS and o.input_line:  # as the command line quoted it (literal_prompts)
                values = [o.input_line.partition("=")[2]]
        _check_addition(o, types)
        _check_choice(o, values, types, searchpath)
        choices[key] = [f"{key}={v}" for v in values]
    return [list(combo) for combo in itertools.product(*choices.values())] or [[]]


def _check_choice(o: Override, values: list[str], types: dict[str, type], searchpath: Sequence[str]) -> None:
    """Group options must exist; switches take exactly true or false (or null where optional)."""
    if o.key_or_group in GROUPS and o.package is None and not o.is_delete():
        allowed = group_options(o.key_or_group, searchpath)
        for v in values:
            if v not in allowed:
                raise UsageError(f"{o.key_or_group}={v!r} is not valid: one of: {', '.join(allowed)}")
    elif types.get(o.key_or_group) in (bool, bool | None) and not o.is_sweep_override():
        # OmegaConf would turn 2 or "yes" into True: a switch takes exactly true or false (or null if optional).
        optional = types[o.key_or_group] is not bool
        if not isinstance(o.value(), bool) and not (optional and o.value() is None):
            allowed = "true, false or null" if optional else "true or false"
            raise UsageError(f"{o.key_or_group}={o.get_value_element_as_str()!r} is not valid: {allowed}")


@contextlib.contextmanager
def hydra_context() -> Iterator[None]:
    """Hydra initialized on the packaged configs (reused if the caller already initialized it)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name=JOB_NAME):
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

    COUNTS["compose"] += 1
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
        COUNTS["compose"] += 1
        tree = compose(config_name=None, overrides=[*searchpath, *placed])
    found = {
        g: {
            n: OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schemas[g]), v))
            for n, v in tree[f"_{g}"].items()
        }
        for g in groups
    }
    return Presets(models=found.get("model", {}), memories=found.get("memory", {}), backends=found.get("backend", {}))
