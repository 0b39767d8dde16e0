"""Sweeps (-m) that researchers can trust: resumable, and every speed-up shown with its cost in fidelity.

- `jobs`: a job's start (skip it if done, else set earlier files aside) and end (frames, then its record).
- `rows`: each job's record (`job_result.json`), written last: its presence means the job finished.
- `resume`: is a job done (from what is on disk)? If not, earlier outputs are moved aside before it reruns.
- `fidelity`: PSNR and SSIM of each job's frames against a baseline job's (torchmetrics).
- `summary`: summary.csv, summary.md and summary.png (time and peak memory against PSNR).
- `compare`: two sweeps side by side, regressions flagged (`python demo.py compare A B`).
- `lock`: one copy of a sweep at a time (`lock_sweep`, at the start of the multirun).

No Hydra here: demo.py decides when to call these; a Python user can call them on any sweep folder.
"""

from contentv.sweep.fidelity import frames_path, metrics, save_frames
from contentv.sweep.jobs import finish_job, start_job
from contentv.sweep.lock import SweepLock, lock_sweep
from contentv.sweep.resume import JobState, checkpoint_identity, count_line, job_items, job_state, set_aside
from contentv.sweep.rows import ROW_FILE, collect, job_rows, read_job_record, write_job_record
from contentv.sweep.summary import Summary, SweepEnd, end_sweep, summarize, write_summary

__all__ = [
    "ROW_FILE",
    "JobState",
    "Summary",
    "SweepEnd",
    "SweepLock",
    "checkpoint_identity",
    "collect",
    "count_line",
    "end_sweep",
    "finish_job",
    "frames_path",
    "job_items",
    "job_rows",
    "job_state",
    "lock_sweep",
    "metrics",
    "read_job_record",
    "save_frames",
    "set_aside",
    "start_job",
    "summarize",
    "write_job_record",
    "write_summary",
]
