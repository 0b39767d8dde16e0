"""A sweep job's start and end, for whatever launches it (demo.py's Hydra task; no Hydra here)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from contentv.sweep.fidelity import save_frames
from contentv.sweep.resume import checkpoint_identity, job_items, job_state, set_aside
from contentv.sweep.rows import job_rows, write_job_record

if TYPE_CHECKING:  # contentv.config and contentv.runtime import torch
    from contentv.config import RunConfig
    from contentv.runtime import RunResult

log = logging.getLogger(__name__)


def start_job(job_dir: Path, cfg: RunConfig, job: int, rank: int = 0, prompts: list[str] | None = None) -> str | None:
    """Before job `job` runs: None when it finished in an earlier run of the sweep (skip it); otherwise the note
    for its rows: empty, or why it is redone and where the files of the earlier attempt went. `prompts`: the job's
    prompts as its resolved run read them."""
    state = job_state(job_dir, cfg, prompts)
    if state.done:
        print(f"job {job}: done in an earlier run, skipped ({job_dir})")
        return None
    if rank != 0:
        return ""
    # Safe before the other ranks write: they first meet rank 0 in a collective (joining the process group, or
    # the broadcast of the output folder in data-parallel runs), which rank 0 reaches only after this.
    note = set_aside(job_dir, state)
    if note:
        log.warning("job %s: %s", job, note)
    return note


def finish_job(
    job_dir: Path,
    job: int,
    overrides: list[str],
    cfg: RunConfig,
    results: list[RunResult],
    error: str | None = None,
    note: str = "",
    rank: int = 0,
    prompts: list[str] | None = None,
) -> None:
    """After job `job` (`overrides`: its sweep overrides): keep each video's frames for the fidelity columns,
    then (rank 0) write the job's record last: its presence marks the job done for a resumed sweep.

    Raises contentv.video.VideoWriteError (an OSError; one line such as "no space left on device while writing
    <folder>") when a file can't be written; the job then has no record and counts as failed/redone."""
    if cfg.sweep.fidelity:
        for result in results:
            save_frames(result)
    if rank == 0:
        rows = job_rows(job, overrides, results, error=error, note=note)
        done = error is None
        checkpoint = checkpoint_identity(cfg) if done else None
        write_job_record(job_dir, job, overrides, job_items(cfg, prompts) if done else [], rows, checkpoint)
