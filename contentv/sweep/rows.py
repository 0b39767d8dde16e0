"""One job's record: the rows it made (one per video, or one failure row), written last, atomically.

`<job folder>/job_result.json` = {"job", "overrides", "items": [[prompt, seed], ...], "finished", "rows": [...]}.
Its presence means the job finished (videos, sidecars and frames are written before it); `resume` reads it back.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # contentv.runtime imports torch and diffusers
    from contentv.runtime import RunResult

ROW_FILE = "job_result.json"
# A job record is a few KB per video; far larger is not one of ours.
MAX_RECORD_BYTES = 64 * 2**20
# Row fields that hold numbers (or nothing): anything else there is a damaged record.
NUMERIC = ("frames", "generate_s", "seconds_per_step", "peak_device_gib", "peak_host_rss_gib", "psnr_db", "ssim")
STAGES = ("load", "text_encoding", "denoising", "decoding", "writing")
# What a video's generation costs once weights are loaded (load is paid by the first job of a key only).
GENERATE_STAGES = ("text_encoding", "denoising", "decoding")


def _gib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**30, 3)


def row_from_record(job: int, overrides: list[str], rec: dict, video: Path, sidecar: Path | None) -> dict:
    """The summary row of one video from its sidecar record (`RunResult.record`)."""
    cfg = rec["config"]["sampling"]
    timings = rec["timings_s"]
    return {
        "job": job,
        "overrides": " ".join(overrides),
        "override_list": list(overrides),  # the chart labels each point with those that differ from the baseline's
        "status": "ok",
        **{f"{s}_s": timings.get(s) for s in STAGES},
        "generate_s": round(sum(timings.get(s) or 0.0 for s in GENERATE_STAGES), 4),
        "seconds_per_step": rec["seconds_per_step"],
        "peak_device_gib": _gib(rec["peak_memory"]["device_bytes"]),
        "peak_host_rss_gib": _gib(rec["peak_memory"]["host_rss_bytes"]),
        # what a fidelity comparison must match on (contentv.sweep.fidelity.MATCH_KEYS)
        "prompt": rec["prompt"],
        "seed": rec["seed"],
        "height": cfg["height"],
        "width": cfg["width"],
        "num_frames": cfg["num_frames"],
        "video": str(video),
        "sidecar": str(sidecar) if sidecar else "",
        "error": "",
    }


def job_rows(
    job: int, overrides: list[str], results: list[RunResult], error: str | None = None, note: str = ""
) -> list[dict]:
    """Rows for one job (`overrides`: its Hydra task overrides): one per video it made (prompt files make
    several), or one failure row."""
    if error is not None:
        failed = {"job": job, "overrides": " ".join(overrides), "override_list": list(overrides), "status": "failed"}
        return [{**failed, "error": error, "note": note}]
    rows = []
    for r in results:
        if not r.record:
            continue
        row = row_from_record(job, overrides, r.record, r.video, r.sidecar)
        if getattr(r, "frames", None) is not None:
            row["frames"] = len(r.frames)  # what the video must play to (resume counts them)
        rows.append({**row, "note": note})
    return rows


def write_job_record(
    job_dir: Path, job: int, overrides: list[str], items: list, rows: list[dict], checkpoint: str | None = None
) -> Path:
    """Write `job_result.json` atomically and never through a link (contentv.atomic): a job killed while writing
    it leaves none, so it counts as interrupted. `items`: the (prompt, seed) pairs the job was asked for;
    `checkpoint`: the identity of the weights it used (resume.checkpoint_identity)."""
    from contentv import atomic

    data = {
        "job": job,
        "overrides": list(overrides),
        "items": [list(i) for i in items],
        "checkpoint": checkpoint,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }
    return atomic.write_json(Path(job_dir) / ROW_FILE, data)


def _check_row(row: object, job: object) -> None:
    """A row as job_rows makes it, or ValueError: the summary and resume index into these fields."""
    if not isinstance(row, dict) or row.get("job") != job or not isinstance(row.get("status"), str):
        raise ValueError(f"{ROW_FILE}: a row that is not one of job {job!r}")
    names = row.get("override_list", [])
    if not isinstance(names, list) or not all(isinstance(o, str) for o in names):
        raise ValueError(f"{ROW_FILE}: override_list is not a list of overrides")
    for key in (*NUMERIC, *(f"{s}_s" for s in STAGES)):
        value = row.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{ROW_FILE}: {key} is not a number")
    for key in ("video", "sidecar", "overrides", "note", "error"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise ValueError(f"{ROW_FILE}: {key} is not text")


def read_job_record(job_dir: Path) -> dict:
    """The job's `job_result.json`, checked for shape (OSError / ValueError if missing, unreadable, too large, too
    deeply nested, or not a record this module writes: `"rows": [1]` is damage, not a row)."""
    from contentv import untrusted

    data = untrusted.load_file(Path(job_dir) / ROW_FILE, MAX_RECORD_BYTES)
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{ROW_FILE}: not a job record")
    job = data.get("job")
    if not isinstance(job, int) or isinstance(job, bool) or job < 0:
        raise ValueError(f"{ROW_FILE}: no job number")
    items = data.get("items", [])
    if not isinstance(items, list) or not all(isinstance(i, list) for i in items):
        raise ValueError(f"{ROW_FILE}: items is not a list of [prompt, seed]")
    for row in data["rows"]:
        _check_row(row, job)
    return data


def job_folders(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep that hold a record, in job order (0, 1, ..., 10, not 0, 1, 10)."""
    found = [p.parent for p in Path(sweep_dir).glob(f"*/{ROW_FILE}")]
    return sorted(found, key=lambda p: (len(p.name), p.name))


def collect(sweep_dir: Path, jobs: int | None = None) -> list[dict]:
    """Every row of every job that finished (in this run or an earlier one), in job order; with `jobs` (how many
    the sweep has now), only jobs 0..jobs-1: a sweep re-run with fewer jobs lists exactly its own."""
    rows: dict[int, list[dict]] = {}
    for folder in job_folders(sweep_dir):
        try:
            record = read_job_record(folder)
        except (OSError, ValueError):
            continue  # a record from an older layout or a damaged one: that job is redone on the next run
        if (jobs is None or record["job"] < jobs) and record["job"] not in rows:
            rows[record["job"]] = record["rows"]
    return [row for job in sorted(rows) for row in rows[job]]
