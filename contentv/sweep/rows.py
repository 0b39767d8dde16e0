"""One job's record: the rows it made (one per video, or one failure row), written last, atomically.

`<job folder>/job_result.json` = {"job", "overrides", "items": [[prompt, seed], ...], "finished", "rows": [...]}.
Its presence means the job finished (videos, sidecars and frames are written before it); `resume` reads it back.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # contentv.runtime imports torch and diffusers
    from contentv.runtime import RunResult

ROW_FILE = "job_result.json"
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
    rows = [row_from_record(job, overrides, r.record, r.video, r.sidecar) for r in results if r.record]
    for row in rows:
        row["note"] = note
    return rows


def write_job_record(job_dir: Path, job: int, overrides: list[str], items: list, rows: list[dict]) -> Path:
    """Write `job_result.json` atomically (temporary file, then rename): a job killed while writing it leaves
    none, so it counts as interrupted. `items`: the (prompt, seed) pairs the job was asked for."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "job": job,
        "overrides": list(overrides),
        "items": [list(i) for i in items],
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".partial.json", dir=job_dir)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the record the usual permissions
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=str)
        os.replace(tmp, job_dir / ROW_FILE)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return job_dir / ROW_FILE


def read_job_record(job_dir: Path) -> dict:
    """The job's `job_result.json` (OSError / ValueError if missing or unreadable)."""
    data = json.loads((Path(job_dir) / ROW_FILE).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{ROW_FILE}: not a job record")
    return data


def job_folders(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep that hold a record, in job order (0, 1, ..., 10, not 0, 1, 10)."""
    found = [p.parent for p in Path(sweep_dir).glob(f"*/{ROW_FILE}")]
    return sorted(found, key=lambda p: (len(p.name), p.name))


def collect(sweep_dir: Path) -> list[dict]:
    """Every row of every job that finished (in this run or an earlier one), in job order."""
    rows = []
    for folder in job_folders(sweep_dir):
        try:
            rows.extend(read_job_record(folder)["rows"])
        except (OSError, ValueError):
            continue  # a record from an older layout or a damaged one: that job is redone on the next run
    return rows
