"""Make a video again from its sidecar alone: the config that ran (memory=auto's choice, VAE tiling as decided, the
prompt and seed), checked against this machine (library versions, the checkpoint) with every difference said.

On the same machine with the same versions and checkpoint the frames are identical (seeds feed a CPU generator).
The backend is the caller's (the command line builds it: `python demo.py replay <sidecar.json>`), so this module
never imports `backends`.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from pathlib import Path
from typing import Any

from contentv.config import RunConfig
from contentv.errors import ConfigError

log = logging.getLogger(__name__)

# Sidecars are small JSON files; anything much larger is not one.
MAX_SIDECAR_BYTES = 8 * 2**20


def read_sidecar(path: str | Path) -> dict:
    """A sidecar's record (ConfigError, one line, for a file that is not one)."""
    from contentv import untrusted

    try:
        record = untrusted.load_file(path, MAX_SIDECAR_BYTES)
    except FileNotFoundError as exc:
        raise ConfigError("replay", str(path), "an existing sidecar (<video>.json)") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError("replay", str(path), f"a readable JSON sidecar ({untrusted.why(exc)})") from exc
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise ConfigError("replay", str(path), "a sidecar written by this runtime (it has no resolved config)")
    return record


def config_of(record: dict, output_dir: str | None = None) -> RunConfig:
    """The RunConfig that made the sidecar's video (unknown fields refused: a sidecar from a newer runtime)."""
    cfg = _build(RunConfig, record["config"], "config")
    cfg.sampling.prompt_file = None  # the sidecar's prompt is the one line this video came from
    cfg.output.dir = output_dir
    cfg.output.name = None
    cfg.mode, cfg.dry_run = "generate", False
    return cfg


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError("replay", where, f"a mapping for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError("replay", f"{where}.{unknown[0]}", f"a field this runtime knows ({cls.__name__})")
    values = {}
    for name, value in data.items():
        hint = hints[name]
        values[name] = _build(hint, value, f"{where}.{name}") if dataclasses.is_dataclass(hint) else value
    return cls(**values)


def differences(record: dict, versions: dict[str, str], checkpoint: dict | None) -> list[str]:
    """What differs between the sidecar's run and this one: library versions, and the checkpoint (for a tiny model
    its build hash; else the folder the weights came from)."""
    out = []
    recorded = record.get("versions") or {}
    for name in sorted(set(recorded) | set(versions)):
        if recorded.get(name) != versions.get(name):
            out.append(f"{name} {recorded.get(name, 'absent')} -> {versions.get(name, 'absent')}")
    was = record.get("checkpoint") or {}
    if checkpoint is not None:
        for key in ("tiny_hash", "folder", "layout"):
            if was.get(key) != checkpoint.get(key):
                out.append(f"checkpoint {key} {was.get(key)} -> {checkpoint.get(key)}")
    return out


def replay(path: str | Path, runtime: Any, output_dir: str | None = None) -> tuple[Any, list[str]]:
    """Make the sidecar's video again with `runtime` (a contentv.runtime.Runtime on the recorded backend): returns
    (RunResult, what differs from the recorded run). The run is resolved as recorded: the memory strategy that ran
    then (not memory=auto again) and VAE tiling as decided then."""
    from contentv.sidecar import checkpoint_record, library_versions

    record = read_sidecar(path)
    cfg = config_of(record, output_dir)
    run = runtime.resolve(cfg)
    checkpoint = checkpoint_record(cfg.model, run.checkpoint or run.spec.resolve_path(cfg.model))
    changed = differences(record, library_versions(), checkpoint)
    for line in changed:
        log.warning("replay: differs from the recorded run: %s", line)
    invocation = {"replay": str(Path(path).absolute())}
    result = runtime.run(dataclasses.replace(run, invocation=invocation))
    return result, changed
