"""Resume: is a sweep job already done? Decided only from what is on disk in its folder.

A job is done when its `job_result.json` exists (written last, atomically) and has the shape this package
writes, every row is ok, every video it names plays to the frame count it records (ffmpeg counts them; a
truncated file has fewer), its lossless frames file, if there is one, opens with that many frames, every
sidecar parses, names that video and records a resolved config equal to the job's on every field that can
change the output, and the checkpoint's files (names, sizes, modification times) are those the job used.
Anything else, a damaged or oddly shaped file included, is redone; files of an earlier attempt are first moved
to `superseded-N/` so they are never counted with the new ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contentv.sweep.fidelity import frames_path
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


def job_items(cfg: RunConfig, prompts: list[str] | None = None) -> list[list]:
    """The [prompt, seed] pairs a job makes: the prompt (or each line of sampling.prompt_file) x its seed(s).
    `prompts`: the job's prompts as its resolved run read them (the file is then not read again)."""
    from contentv.validation import read_prompt_file

    s = cfg.sampling
    if prompts is None:
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


def checkpoint_identity(cfg: RunConfig) -> str | None:
    """What identifies the weights a job used: a hash of the names, sizes and modification times of the files in
    model.path (a hub id: in its local cache snapshot), so weights replaced in place count as a change. None
    for tiny models (built in code from the config, which is compared already)."""
    m = cfg.model
    if m.tiny or not m.path:
        return None
    from contentv.models.common import local_config_folder

    local = Path(m.path).expanduser()
    folder = local if local.is_dir() else local_config_folder(m.path, "model_index.json", m.revision)
    if folder is None:  # a hub id not downloaded yet: its name and revision until it is
        return f"{m.path}@{m.revision or 'main'}"
    entries = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.endswith(".md"):
                continue
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join(root, name))  # hub snapshots link to blobs: the blob's size and time
                entries.append(f"{os.path.relpath(os.path.join(root, name), folder)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


def job_state(job_dir: Path, cfg: RunConfig, prompts: list[str] | None = None) -> JobState:
    """Is the job with config `cfg` (as composed: null sampling fields allowed) done in `job_dir`? Never raises
    for what is on disk: a record of the wrong shape is a reason to redo the job. `prompts`: as its resolved run
    read them (see job_items)."""
    job_dir = Path(job_dir)
    left = leftovers(job_dir)
    if not (job_dir / ROW_FILE).is_file():
        return JobState(False, "interrupted" if left else "new", left)
    try:
        reason = _outdated(job_dir, cfg, prompts)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:  # damage of any shape
        reason = f"unreadable records ({type(exc).__name__}: {str(exc)[:100]})"
    return JobState(True) if reason is None else JobState(False, reason, left)


def _outdated(job_dir: Path, cfg: RunConfig, prompts: list[str] | None = None) -> str | None:
    """Why the job in `job_dir` must run again, or None if it is done (see the module's docstring)."""
    try:
        record = read_job_record(job_dir)
    except (OSError, ValueError) as exc:
        return f"unreadable {ROW_FILE} ({exc})"
    rows = record["rows"]
    if not rows or any(r.get("status") != "ok" for r in rows):
        return "failed"
    items = job_items(cfg, prompts)
    if record.get("items") != items:
        return "config changed: the prompts or seeds"
    if record.get("checkpoint") != checkpoint_identity(cfg):
        return "checkpoint changed: the files at model.path are not those the job used"
    expected = expected_config(cfg)
    for row in rows:
        reason = _row_outdated(row, job_dir, expected, items, cfg.sweep.fidelity)
        if reason is not None:
            return reason
    return None


def video_frames(video: Path) -> int | None:
    """Frames ffmpeg reads from `video` without decoding them (a truncated file has fewer); None if unreadable."""
    import imageio_ffmpeg

    try:
        return imageio_ffmpeg.count_frames_and_secs(str(video))[0]
    except Exception:  # noqa: BLE001 - any failure to read it means it does not play
        return None


def frames_shape(path: Path) -> tuple[int, ...] | None:
    """The shape stored in a frames file (contentv.video.write_frames) from its header, or None if it is missing
    or damaged (a truncated zip has no directory). The data is read in full only by the summary."""
    import numpy as np

    try:
        with zipfile.ZipFile(path) as z, z.open("frames.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, _ = read(f)
        return tuple(shape)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None


def _row_outdated(row: dict, job_dir: Path, expected: dict, items: list[list], fidelity: bool) -> str | None:
    """Why one row's video can't be reused (missing, short, unrecorded, or made with another config), or None."""
    from contentv import untrusted

    multi = len(items) > 1
    video = _path(row.get("video") or "", job_dir)
    if not row.get("video") or not video.is_file():
        return f"video missing: {video.name}"
    if not row.get("sidecar"):
        return "no sidecar (output.sidecar=false): nothing records what made the video"
    sidecar = _path(row["sidecar"], job_dir)
    try:
        rec = untrusted.load_file(sidecar, 16 * 2**20)
        recorded = rec["config"]
        if not isinstance(recorded, dict) or not isinstance(recorded.get("sampling"), dict):
            raise TypeError("config")
    except (OSError, ValueError, KeyError, TypeError):
        return f"sidecar missing or unreadable: {sidecar.name}"
    if rec.get("video") != video.name:
        return f"sidecar {sidecar.name} names another video"
    changed = differences(recorded, expected, PER_VIDEO if multi else ())
    if multi and [rec.get("prompt"), rec.get("seed")] not in items:
        changed.append(f"prompt/seed {rec.get('prompt')!r}/{rec.get('seed')} no longer asked for")
    if changed:
        return "config changed: " + "; ".join(changed[:3]) + (" ..." if len(changed) > 3 else "")
    # the frames the job wrote (rows of older versions: the frames asked for)
    frames = row.get("frames", recorded["sampling"].get("num_frames"))
    found = video_frames(video)
    if found != frames:
        return f"video incomplete: {video.name} plays {found if found is not None else 'no'} of {frames} frames"
    # a job run with sweep.fidelity=false has none (the summary says so); one that is there must open
    if fidelity and os.path.lexists(frames_path(video)):
        shape = frames_shape(frames_path(video))
        if shape is None or len(shape) != 4 or shape[0] != frames:
            return f"frames file damaged: {frames_path(video).name}"
    return None


def set_aside(job_dir: Path, state: JobState) -> str:
    """Before a job runs again: move what an earlier attempt wrote to `superseded-N/` (so it is kept but never
    counted) and drop hidden `.partial` temporaries of a writer that is gone (never a live one: see
    contentv.video.clean_stale_partials). Returns a note for the job's rows; VideoWriteError (one line) if the
    folder can't be changed (a full disk, a read-only mount)."""
    from contentv.video import _write_error, clean_stale_partials

    job_dir = Path(job_dir)
    # only the partials of writers that are gone: a live one may be another copy's video being encoded
    clean_stale_partials(job_dir)
    keep = [p for p in state.leftovers if not (p.name.startswith(".") and ".partial" in p.name) and p.exists()]
    if not keep:
        return ""
    n = 1
    while (job_dir / f"{SUPERSEDED}-{n}").exists():
        n += 1
    target = job_dir / f"{SUPERSEDED}-{n}"
    try:
        target.mkdir()
        for p in keep:
            shutil.move(str(p), target / p.name)
    except OSError as exc:
        raise _write_error(exc, job_dir) from exc
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
