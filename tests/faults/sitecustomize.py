"""Fault injection for subprocess tests: put this folder first on PYTHONPATH. Python imports it at start-up, in
demo.py and in every launcher worker it spawns. Does nothing unless a CONTENTV_FAULT_* variable is set.

CONTENTV_FAULT_LOG=<file>         one JSON line per event: {"event": "generate" | "recorded", "job": <job folder
                                  name>, "pid": ...}: a job's generation starting, its record being written.
CONTENTV_FAULT_FAIL_SEED=<n>      Runtime.generate raises for sampling.seed == n: a job failing at run time.
CONTENTV_FAULT_PREEMPT_JOB=<name> the first generation of job folder <name> sends SIGUSR2 to its own process, as
                                  SLURM (through submitit) signals a preempted job; once per log file.
CONTENTV_FAULT_STEP_SECONDS=<s>   every denoising step lasts at least <s> seconds more: a job reliably still running
                                  when a test kills the process (the next process, without it, runs at full speed).
CONTENTV_PROBE_IMPORTS=<file>     at exit, the names of the top-level modules the process imported (JSON list):
                                  an observation only, nothing changes.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

LOG = os.environ.get("CONTENTV_FAULT_LOG")
FAIL_SEED = os.environ.get("CONTENTV_FAULT_FAIL_SEED")
PREEMPT_JOB = os.environ.get("CONTENTV_FAULT_PREEMPT_JOB")
STEP_SECONDS = os.environ.get("CONTENTV_FAULT_STEP_SECONDS")
PROBE_IMPORTS = os.environ.get("CONTENTV_PROBE_IMPORTS")


def _event(event: str, job: str) -> None:
    if LOG:
        with open(LOG, "a") as f:
            f.write(json.dumps({"event": event, "job": job, "pid": os.getpid()}) + "\n")


def _slowed(callback):
    import time

    def slow_step(pipe, i, t, tensors):
        time.sleep(float(STEP_SECONDS))
        return callback(pipe, i, t, tensors) if callback is not None else {}

    return slow_step


def _install() -> None:
    import contentv.sweep.jobs
    from contentv.runtime import Runtime

    generate, write_job_record = Runtime.generate, contentv.sweep.jobs.write_job_record

    def faulty_generate(self, run, *args, **kwargs):
        cfg = run.config() if callable(getattr(run, "config", None)) else run  # a ResolvedRun or a RunConfig
        job = Path(cfg.output.dir or ".").name
        _event("generate", job)
        if FAIL_SEED is not None and cfg.sampling.seed == int(FAIL_SEED):
            raise RuntimeError(f"injected failure for seed {FAIL_SEED}")
        if PREEMPT_JOB == job and LOG:
            try:
                Path(f"{LOG}.preempted").touch(exist_ok=False)
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGUSR2)
        if STEP_SECONDS is not None:
            kwargs["callback_on_step_end"] = _slowed(kwargs.get("callback_on_step_end"))
        return generate(self, run, *args, **kwargs)

    def logged_write_job_record(job_dir, *args, **kwargs):
        path = write_job_record(job_dir, *args, **kwargs)
        _event("recorded", Path(job_dir).name)
        return path

    Runtime.generate = faulty_generate
    contentv.sweep.jobs.write_job_record = logged_write_job_record


def _write_imports() -> None:
    import sys

    Path(PROBE_IMPORTS).write_text(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))


if LOG or FAIL_SEED or PREEMPT_JOB or STEP_SECONDS:
    _install()
if PROBE_IMPORTS:
    import atexit

    atexit.register(_write_imports)
