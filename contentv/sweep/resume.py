"""Resume: is a sweep job already done? Decided only from what is on disk in its folder.

A job is done when its `job_result.json` exists (written last, atomically), every row is ok, every video it
names exists, every sidecar parses, names that video and records a resolved config equal to the job's on every
field that can change the output. Anything else is redone; files of an earlier attempt are first moved to
`superseded-N/` so they are never counted with the new ones.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contentv.sweep.rows import ROW_FILE, read_job_record

if TYPE_CHECKING:  # contentv.config imports torch: the compare command doesn't need it
    from contentv.config import RunConfig

# Fields that never change a video: where it is written (the job folder itself decides that), which device of
# the kind ran it (a scheduler assigns it), how weights are fetched, sweep-wide settings and non-generate modes.
IGNORED = ("output.dir", "backend.device_index", "model.local_files_only", "sweep", "ui", "mode", "dry_run", "debug")
# Set per video when a job makes several (a prompt file, parallel.seeds); `items` covers those.
PER_VIDEO = ("sampling.prompt", "sampling.prompt_file", "sampling.seed", "output.name")
# A limit on the run's size, not a setting of any video.
IGNORED += ("sampling.max_prompts",)
SUPERSEDED = "superseded"


@dataclass
class JobState:
    """Whether a job is done, and if not why (new, interrupted, failed, config changed, a file missing, ...)."""

    done: bool
    reason: str = ""
    # files an earlier attempt left in the job folder (moved aside before the job runs again)
    leftovers: list[Path] = field(default_factory=list)


def job_items(cfg: RunConfig) -> list[list]:
    """The [prompt, seed] pairs a job makes: the prompt (or each line of sampling.prompt_file) x its seed(s)."""
    from contentv.validation import read_prompt_file

    s = cfg.sampling
    prompts = read_prompt_file(s.prompt_file, s.max_prompts) if s.prompt_file else [s.prompt]
    return [[p, seed] for p in prompts for seed in (cfg.parallel.seeds or [s.seed])]


def expected_config(cfg: RunConfig) -> dict:
    """The job's config as a sidecar records it: null sampling fields filled with the model's defaults, and
    through JSON (as the sidecar was) so that tuples, floats and the like compare equal."""
    from contentv.config import resolve_sampling

    resolved = dataclasses.replace(cfg, sampling=resolve_sampling(cfg.sampling, cfg.model))
    return json.loads(json.dumps(dataclasses.asdict(resolved), default=str))


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(recorded: dict, expected: dict, skip: tuple[str, ...] = ()) -> list[str]:
    """`key: recorded -> expected` for every output-determining field that differs. memory=auto is compared by
    name only: the sidecar holds the preset the planner chose then, a valid answer to the same request."""
    skip = (*IGNORED, *skip)
    if expected.get("memory", {}).get("name") == "auto":
        skip = (*skip, "memory")
    a, b = _flat(recorded), _flat(expected)
    out = []
    for key in sorted(set(a) | set(b)):
        if any(key == s or key.startswith(s + ".") for s in skip):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return out


def leftovers(job_dir: Path) -> list[Path]:
    """Files an earlier attempt may have left: everything at the top of the job folder but Hydra's own
    (.hydra/, the job's .log) and earlier superseded-N/ folders."""
    job_dir = Path(job_dir)
    if not job_dir.is_dir():
        return []
    return sorted(
        p
        for p in job_dir.iterdir()
        if p.is_file() and p.suffix != ".log" and not (p.name.startswith(".") and ".partial" not in p.name)
    )


def _path(value: str, job_dir: Path) -> Path:
    p = Path(value)
    return p if p.is_absolute() else job_dir / p


def job_state(job_dir: Path, cfg: RunConfig) -> JobState:
    """Is the job with config `cfg` (as composed: null sampling fields allowed) done in `job_dir`?"""
    job_dir = Path(job_dir)
    left = leftovers(job_dir)

    def redo(reason: str) -> JobState:
        return JobState(False, reason, left)

    if not (job_dir / ROW_FILE).is_file():
        return redo("interrupted" if left else "new")
    try:
        record = read_job_record(job_dir)
    except (OSError, ValueError) as exc:
        return redo(f"unreadable {ROW_FILE} ({exc})")
    rows = record["rows"]
    if not rows or any(r.get("status") != "ok" for r in rows):
        return redo("failed")
    items = job_items(cfg)
    if record.get("items") != items:
        return redo("config changed: the prompts or seeds")
    expected = expected_config(cfg)
    for row in rows:
        reason = _row_outdated(row, job_dir, expected, items)
        if reason is not None:
            return redo(reason)
    return JobState(True)


def _row_outdated(row: dict, job_dir: Path, expected: dict, items: list[list]) -> str | None:
    """Why one row's video can't be reused (missing, unrecorded, or made with another config), or None."""
    multi = len(items) > 1
    video = _path(row.get("video") or "", job_dir)
    if not row.get("video") or not video.is_file():
        return f"video missing: {video.name}"
    if not row.get("sidecar"):
        return "no sidecar (output.sidecar=false): nothing records what made the video"
    sidecar = _path(row["sidecar"], job_dir)
    try:
        rec = json.loads(sidecar.read_text())
        recorded = rec["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"sidecar missing or unreadable: {sidecar.name}"
    if rec.get("video") != video.name:
        return f"sidecar {sidecar.name} names another video"
    changed = differences(recorded, expected, PER_VIDEO if multi else ())
    if multi and [rec.get("prompt"), rec.get("seed")] not in items:
        changed.append(f"prompt/seed {rec.get('prompt')!r}/{rec.get('seed')} no longer asked for")
    if changed:
        return "config changed: " + "; ".join(changed[:3]) + (" ..." if len(changed) > 3 else "")
    return None


def set_aside(job_dir: Path, state: JobState) -> str:
    """Before a job runs again: move what an earlier attempt wrote to `superseded-N/` (so it is kept but never
    counted) and drop hidden `.partial` temporaries of a killed writer. Returns a note for the job's rows."""
    job_dir = Path(job_dir)
    partial = [p for p in state.leftovers if p.name.startswith(".") and ".partial" in p.name]
    keep = [p for p in state.leftovers if p not in partial]
    for p in partial:
        p.unlink(missing_ok=True)
    if not keep:
        return ""
    n = 1
    while (job_dir / f"{SUPERSEDED}-{n}").exists():
        n += 1
    target = job_dir / f"{SUPERSEDED}-{n}"
    target.mkdir()
    for p in keep:
        shutil.move(str(p), target / p.name)
    return f"redone ({state.reason}); earlier files in {target.name}/"


def count_line(states: list[JobState]) -> str:
    """The line a sweep prints at start: how many jobs, how many done, how many to run (and why)."""
    done = sum(s.done for s in states)
    line = f"sweep: {len(states)} jobs, {done} done, {len(states) - done} to run"
    reasons: dict[str, int] = {}
    for s in states:
        if not s.done and s.reason != "new":
            key = s.reason.split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
    if reasons:
        line += " (" + ", ".join(f"{n} {k}" for k, n in reasons.items()) + ")"
    return line
